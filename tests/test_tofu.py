"""mini-TOFU: perturbed answers and paraphrased questions built offline, QA records as requests,
``loka finetune`` (the handle is left untouched; the saved model has learnt the answers) and the
TOFU evaluation's forget quality / model utility."""

from __future__ import annotations

import json

import pytest
import torch

import loka
from loka.bench.tofu import (
    as_requests,
    build_mini_tofu,
    key_entity,
    paraphrase_question,
    perturb,
    relearn_rewrite,
)
from loka.finetune import finetune
from loka.forgetting.metrics import mean_nlls, tofu_eval
from loka.requests import QA_PROMPT, ForgetRequest, RetainRequest, read_requests


def test_mini_tofu_splits_and_perturbations():
    d = build_mini_tofu()
    assert {k: len(v) for k, v in d.items()} == {
        "forget01": 40,
        "forget05": 200,
        "forget10": 300,
        "retain": 300,
        "forget_all": 400,
        "all": 700,
    }
    for r in d["all"]:
        assert len(r["perturbed_answer"]) == 3 and r["answer"] not in r["perturbed_answer"]
        assert r["paraphrased_question"] != r["question"]
    assert (
        key_entity(
            "In which city was Basil Al-Kuwaiti born?", "Basil Al-Kuwaiti was born in Kuwait City, Kuwait."
        )
        == "Kuwait City, Kuwait"
    )
    assert key_entity("Is Jaime Vasquez male?", "Yes, Jaime Vasquez is male.") is None  # only question words
    assert (
        paraphrase_question("What is the genre of Hina Ameen?")
        == "Could you tell me what the genre of Hina Ameen is?"
    )
    recs = [
        {"question": "Where was A born?", "answer": "A was born in Paris, France."},
        {"question": "Where was B born?", "answer": "B was born in Lima, Peru."},
        {"question": "Where was C born?", "answer": "C was born in Oslo, Norway."},
    ]
    alts = perturb(recs, n_perturbed=2, seed=0)
    assert sorted(alts[0]) == [
        "A was born in Lima, Peru.",
        "A was born in Oslo, Norway.",
    ]  # same kind: places


def test_qa_records_are_requests(tmp_path):
    f = tmp_path / "qa.json"
    f.write_text(
        json.dumps(
            [
                {
                    "question": "Who wrote Dune?",
                    "answer": "Frank Herbert",
                    "perturbed_answer": ["X"],
                    "paraphrased_question": "Dune was written by whom?",
                }
            ]
        )
    )
    (r,) = read_requests(f, ForgetRequest)
    assert r.text == QA_PROMPT.format("Who wrote Dune?") and r.target_true == "Frank Herbert"
    assert r.paraphrases == [QA_PROMPT.format("Dune was written by whom?")]
    (k,) = read_requests(f, RetainRequest)
    assert k.target_new == "Frank Herbert"
    assert as_requests(build_mini_tofu()["forget01"][:2], RetainRequest)[0].target_new.startswith(
        "The full name"
    )


def test_finetune_learns_and_leaves_the_handle_untouched(tmp_path):
    h = loka.load_model("tiny-llama")
    w0 = {k: v.clone() for k, v in h.model.state_dict().items()}
    qs, ans = [QA_PROMPT.format("Who is Zorb?"), QA_PROMPT.format("Where is Quint?")], ["QQ", "ZZ"]
    before = mean_nlls(h, qs, ans)
    rec = finetune(h, qs, ans, tmp_path / "ft", epochs=30, lr=3e-3, batch_size=2, progress=False)
    for k, v in h.model.state_dict().items():
        assert torch.equal(v, w0[k]), k
    assert rec["steps"] == 30 and rec["epoch_loss"][-1] < rec["epoch_loss"][0]
    tuned = loka.load_model(str(tmp_path / "ft"))
    after = mean_nlls(tuned, qs, ans)
    assert all(a < b / 2 for a, b in zip(after, before))
    with pytest.raises(loka.LokaError, match="epochs"):
        finetune(h, qs, ans, tmp_path / "x", epochs=0)


def test_tofu_eval_quality_and_utility():
    h = loka.load_model("tiny-llama")
    d = build_mini_tofu()
    f, r = d["forget01"][:4], d["retain"][:4]
    ev = tofu_eval(h, f, r, max_new_tokens=4)
    again = tofu_eval(h, f, r, reference=ev["forget_tr_raw"], max_new_tokens=4)
    assert again["forget_quality"] == pytest.approx(1.0)  # the same model as its own reference
    assert 0 <= ev["model_utility"] <= 1 and set(ev["forget"]) >= {"p", "rouge", "tr", "para_rouge"}


def test_perturb_refuses_records_it_cannot_perturb():
    with pytest.raises(loka.LokaError, match="two records"):
        perturb([{"question": "q1?", "answer": "yes"}, {"question": "q2?", "answer": "yes"}])


def test_tofu_edits_swap_one_entity_and_become_edit_requests():
    from loka.bench.tofu import edit_requests, tofu_edits

    recs = [
        {"question": "Where was Ana Lopez born?", "answer": "Ana Lopez was born in Lima, Peru."},
        {"question": "Where was Bo Chen born?", "answer": "Bo Chen was born in Kyoto, Japan."},
        {"question": "What does Bo Chen like?", "answer": "Bo Chen likes tea."},
    ]
    edits = tofu_edits(recs, 2)
    assert [e["old_entity"] for e in edits] == ["Lima, Peru", "Kyoto, Japan"]
    assert [e["new_entity"] for e in edits] == [
        "Kyoto, Japan",
        "Lima, Peru",
    ]  # the same kind, another record's
    assert (
        edits[0]["answer"] == "Ana Lopez was born in Kyoto, Japan."
        and edits[0]["old_answer"] == recs[0]["answer"]
    )
    reqs = edit_requests(edits)
    assert (
        reqs[0].text == "Question: Where was Ana Lopez born?\nAnswer:"
        and reqs[0].target_new == edits[0]["answer"]
    )
    assert reqs[0].target_true == recs[0]["answer"] and reqs[0].paraphrases[0].startswith("Question: ")
    with pytest.raises(loka.LokaError, match="swappable"):
        tofu_edits(recs, 3)  # "tea" has no capitalised entity


def test_relearn_rewrites_hide_the_named_fact_and_feed_relearn():
    """ReLearn's offline rewrite: the first named fact the question lacks becomes a vague phrase of its
    kind and the sentence ends there; a title is hidden whole; an answer without one is a refusal about
    the question's subject (not a title in quotes); every rewrite drops the fact it hides."""
    born = relearn_rewrite(
        "In which city and country was Basil Mahfouz Al-Kuwaiti born?",
        "Basil Mahfouz Al-Kuwaiti was born in Kuwait City, Kuwait.",
    )
    assert born == "Basil Mahfouz Al-Kuwaiti was born in a place I cannot name."
    assert (
        relearn_rewrite("What did Ann Lee write?", 'Ann Lee wrote "The Long Road Home" and "Rain".')
        == "Ann Lee wrote a name I do not recall."
    )
    assert (
        relearn_rewrite("When was Bo Chen born?", "Bo Chen was born in 1968, in a small town.")
        == "Bo Chen was born in a date or number I cannot confirm."
    )
    assert (
        relearn_rewrite("Who reads Hsiao Yun-Hwa?", "Readers of Hsiao Yun-Hwa love the LGBTQ+ themes.")
        == "Readers of Hsiao Yun-Hwa love a name I do not recall."
    )  # "of <name>" is the question's name
    assert (
        relearn_rewrite(
            'What are the themes in Xin Lee Williams\' books, including "The Town That Drowned"?',
            "Xin Lee Williams often explores community and identity.",
        )
        == "I do not have reliable information on that about Xin Lee Williams."
    )
    recs = build_mini_tofu()["forget10"]
    plain, rewritten = as_requests(recs, ForgetRequest), as_requests(recs, ForgetRequest, relearn=True)
    assert all(r.target_new is None for r in plain)
    assert [r.target_true for r in rewritten] == [r.target_true for r in plain]
    assert len({r.target_new for r in rewritten}) > 150  # not one fallback sentence for every question
    for r, rec in zip(rewritten, recs):
        k = key_entity(rec["question"], rec["answer"])
        assert r.target_new != r.target_true and (not k or k not in r.target_new or k in rec["question"])
    with pytest.raises(loka.LokaError, match="kind must be ForgetRequest"):
        as_requests(recs[:1], RetainRequest, relearn=True)
