"""Unlearning: losses, masking, TOFU metrics and the training-based methods (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch

import loka
from loka.forgetting import losses as L
from loka.forgetting import metrics as M
from loka.requests import ForgetRequest, RetainRequest, read_requests


@pytest.fixture(scope="module")
def tiny():
    return loka.load_model("tiny-llama")


def test_answer_masking_covers_only_answer_tokens(tiny):
    tok = tiny.tokenizer
    b = L.qa_batch(tok, ["The capital of France is", "Hi"], ["Paris", "a longer answer here"])
    for i, ans in enumerate(["Paris", "a longer answer here"]):
        a_ids = tok(" " + ans, add_special_tokens=False)["input_ids"]
        lab = b.labels[i]
        kept = lab[lab != L.IGNORE].tolist()
        assert kept == a_ids
        # label at t is the token at t+1: the kept labels are exactly the row's last len(a_ids) real tokens
        n = int(b.attention_mask[i].sum())
        assert b.input_ids[i, n - len(a_ids) : n].tolist() == a_ids
        assert (lab[: n - len(a_ids) - 1] == L.IGNORE).all() and (lab[n - 1 :] == L.IGNORE).all()


def test_npo_gradient_equals_gradient_ascent_at_initialisation(tiny):
    """At θ = θ_ref, ∇L_NPO = mean ∇ log p_θ(y|x): gradient ascent on the summed NLL (§6.3)."""
    b = L.qa_batch(
        tiny.tokenizer, ["The capital of France is", "Water boils at"], ["Paris", "one hundred degrees"]
    )
    p = tiny.param(tiny.weight_name(1))
    p.requires_grad_(True)
    try:
        lg, rows = L.answer_logits(tiny, b)
        lp, _ = L.sequence_logprobs(lg, rows, b)
        (g_npo,) = torch.autograd.grad(L.npo_loss(lp, lp.detach(), beta=0.1), p, retain_graph=True)
        (g_ga,) = torch.autograd.grad(lp.mean(), p)
    finally:
        p.requires_grad_(False)
    assert torch.allclose(g_npo, g_ga, rtol=1e-5, atol=1e-8)
    assert float(L.npo_loss(lp.detach(), lp.detach(), 0.1)) == pytest.approx(
        20 * torch.log(torch.tensor(2.0)).item()
    )


def test_truth_ratio_of_identical_distributions_is_one():
    assert M.truth_ratio(1.7, [1.7, 1.7, 1.7]) == pytest.approx(1.0)
    assert M.truth_ratio_forget([1.0, 1.0]) == pytest.approx(1.0)
    assert M.truth_ratio_retain([1.0]) == 0.0
    # hand-computed: ℓ(ã) = 1, perturbed mean 2 -> R = e^-1; forget min(R, 1/R) = e^-1; retain 1 - e^-1
    r = M.truth_ratio(1.0, [1.5, 2.5])
    assert r == pytest.approx(0.36787944)
    assert M.truth_ratio_forget([r, 1 / r]) == pytest.approx(0.36787944)
    assert M.truth_ratio_retain([r, 2.0]) == pytest.approx((1 - 0.36787944) / 2)


def test_ks_forget_quality_of_identical_samples_is_one():
    xs = [0.1, 0.4, 0.35, 0.8, 0.9]
    assert M.forget_quality(xs, list(xs)) == pytest.approx(1.0)
    assert M.forget_quality([0.01 * i for i in range(20)], [1 + 0.01 * i for i in range(20)]) < 1e-6


def test_rouge_l_recall_by_hand():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4 of 6 reference tokens
    assert M.rouge_l_recall("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    assert M.rouge_l_recall("Paris is the capital", "Paris") == pytest.approx(1.0)
    assert M.rouge_l_recall("", "Paris") == 0.0
    assert M.rouge_l_recall("mat the on", "the mat") == pytest.approx(1 / 2)
    assert M.model_utility([0.5, 0.5]) == pytest.approx(0.5)
    assert M.model_utility([1.0, 0.5]) == pytest.approx(2 / 3)
    assert M.model_utility([0.3, 0.0]) == 0.0


def test_forget_request_validation_and_readers(tmp_path):
    with pytest.raises(loka.RequestError, match="target_true"):
        ForgetRequest("{} lives in", "Ann", target_new=None)
    with pytest.raises(loka.RequestError, match="'target_true' must be a non-empty string"):
        ForgetRequest("{} lives in", "Ann", target_true=" ")
    fr = ForgetRequest("{} lives in", "Ann", target_true="Paris")
    assert fr.target_new is None and fr.text == "Ann lives in"
    f = tmp_path / "f.jsonl"
    f.write_text(json.dumps({"prompt": "{} lives in", "subject": "Ann", "answer": "Paris"}) + "\n")
    (r,) = read_requests(f, ForgetRequest)
    assert isinstance(r, ForgetRequest) and r.target_true == "Paris"
    (r,) = read_requests(f, RetainRequest)
    assert isinstance(r, RetainRequest) and r.target_new == "Paris"
    cf = tmp_path / "cf.json"
    cf.write_text(
        json.dumps(
            [
                {
                    "case_id": 3,
                    "requested_rewrite": {
                        "prompt": "{} is in",
                        "subject": "Rome",
                        "target_new": {"str": "Asia"},
                        "target_true": {"str": "Europe"},
                    },
                }
            ]
        )
    )
    (r,) = read_requests(cf, ForgetRequest)
    assert r.target_true == "Europe" and r.target_new is None
    f.write_text(json.dumps({"prompt": "{} lives in", "subject": "Ann"}) + "\n")
    with pytest.raises(loka.RequestError, match="missing field"):
        read_requests(f, ForgetRequest)


FACT = ("{} was born in the city of", "Zorblax Quint", "Q")  # the tiny models tokenise bytes: a short answer
HP = {"layers": [0, 1, 2, 3], "lr": 0.05, "max_steps": 100}


def _em(handle, prompt, answer) -> float:
    b = L.qa_batch(handle.tokenizer, [prompt], [answer])
    with torch.no_grad():
        lg, rows = L.answer_logits(handle, b)
    return float(L.exact_match(lg, rows, b)[0])


def test_ft_learns_then_npo_forgets_and_reverts_restore_bit_for_bit(tiny):
    """Editing and unlearning share one trainer: FT teaches a fact, NPO removes it, both revert exactly."""
    p, s, a = FACT
    text = p.replace("{}", s)
    names = [tiny.weight_name(i) for i in range(tiny.n_layers)]
    before = {n: tiny.param(n).detach().clone() for n in names}
    assert _em(tiny, text, a) == 0.0
    learn = loka.edit(tiny, loka.EditRequest(p, s, a), "ft", {**HP, "linf_constraint": None}, progress=False)
    assert learn.manifest["extra"]["edit_em"] == 1.0 and _em(tiny, text, a) == 1.0
    assert learn.manifest["extra"]["stopped_early"]
    forget = loka.edit(tiny, ForgetRequest(p, s, target_true=a), "npo", HP, progress=False)
    assert forget.manifest["extra"]["forget_em"] == 0.0 and _em(tiny, text, a) == 0.0
    assert forget.manifest["extra"]["history"][0]["forget"] == pytest.approx(20 * 0.6931472, rel=1e-4)
    forget.revert(tiny)
    assert _em(tiny, text, a) == 1.0
    learn.revert(tiny)
    for n in names:
        assert torch.equal(tiny.param(n), before[n]), n


@pytest.mark.parametrize("method", ["ga", "gd", "simnpo", "idk", "dpo", "relearn"])
def test_each_forget_loss_removes_a_learned_fact(tiny, method):
    p, s, a = FACT
    text = p.replace("{}", s)
    learn = loka.edit(tiny, loka.EditRequest(p, s, a), "ft", {**HP, "linf_constraint": None}, progress=False)
    try:
        keep = RetainRequest("{} was born in the city of", "Mira Olde", "L")
        hp = {**HP, **({"gamma": 1.0} if method == "simnpo" else {})}
        art = loka.edit(tiny, [ForgetRequest(p, s, target_true=a), keep], method, hp, progress=False)
        assert art.manifest["extra"]["forget_em"] == 0.0 and _em(tiny, text, a) == 0.0
        assert art.manifest["extra"]["retain"] == (0 if method == "ga" else 1)
        art.revert(tiny)
    finally:
        learn.revert(tiny)


def test_relearn_rewrites_name_no_forgotten_entity(tiny):
    from loka.methods.train import RELEARN_FALLBACK, relearn_answer

    r = ForgetRequest(
        "The mother tongue of {} is",
        "Danielle Darrieux",
        target_true="French",
        relation_id="P103",
        paraphrases=["Danielle Darrieux grew up speaking the language"],
    )
    assert relearn_answer(r) == "a language"
    assert relearn_answer(ForgetRequest("{} wrote", "Jaime Vasquez", target_true="Fire")) == RELEARN_FALLBACK
    assert (
        relearn_answer(ForgetRequest("{} wrote", "X Y", target_true="Fire", target_new="several novels"))
        == "several novels"
    )
    p, s, a = FACT
    learn = loka.edit(tiny, loka.EditRequest(p, s, a), "ft", {**HP, "linf_constraint": None}, progress=False)
    text = p.replace("{}", s)

    def rewrite_logp() -> float:
        b = L.qa_batch(tiny.tokenizer, [text], ["Q R"])
        with torch.no_grad():
            lg, rows = L.answer_logits(tiny, b)
            return float(L.sequence_logprobs(lg, rows, b)[0][0])

    try:  # the rewrite is learned on the prompt and on each paraphrase: 2 rows
        before = rewrite_logp()
        art = loka.edit(
            tiny,
            ForgetRequest(p, s, target_true=a, target_new="Q R", paraphrases=[s + " lives in"]),
            "relearn",
            HP,
            progress=False,
        )
        assert art.manifest["extra"]["relearn_rows"] == 2
        assert _em(tiny, text, a) == 0.0 and rewrite_logp() > before + 1.0
        art.revert(tiny)
    finally:
        learn.revert(tiny)


def test_joint_edit_and_forget_in_one_run(tiny):
    p, s, a = FACT
    learn = loka.edit(tiny, loka.EditRequest(p, s, a), "ft", {**HP, "linf_constraint": None}, progress=False)
    try:
        edit = loka.EditRequest("{} works as a", "Perla Vint", "Z")
        art = loka.edit(tiny, [ForgetRequest(p, s, target_true=a), edit], "npo", HP, progress=False)
        ex = art.manifest["extra"]
        assert ex["forget_em"] == 0.0 and ex["edit_em"] == 1.0
        assert _em(tiny, "Perla Vint works as a", "Z") == 1.0 and _em(tiny, p.replace("{}", s), a) == 0.0
        art.revert(tiny)
    finally:
        learn.revert(tiny)


def test_bad_retain_loss_is_refused(tiny):
    with pytest.raises(loka.LokaError, match="retain_loss"):
        loka.edit(
            tiny, ForgetRequest(*FACT[:2], target_true=FACT[2]), "npo", {"retain_loss": "l2"}, progress=False
        )


def _records(n_rel=4, per=6):
    recs = []
    for r in range(n_rel):
        for k in range(per):
            recs.append(
                {
                    "case_id": len(recs),
                    "requested_rewrite": {
                        "prompt": f"{{}} rel{r} is",
                        "subject": f"S{r}_{k}",
                        "relation_id": f"P{r}",
                        "target_true": {"str": f"o{r}_{k % 3}"},
                        "target_new": {"str": f"o{r}_{(k + 1) % 3}"},
                    },
                    "paraphrase_prompts": [f"About S{r}_{k}: rel{r} is"],
                }
            )
    return recs


@pytest.mark.parametrize("setting", ["in", "out"])
def test_joint_tasks_are_disjoint_and_respect_the_profile(setting):
    from loka.bench.tasks import build_tasks

    t = build_tasks(_records(), setting, n_edit=5, n_forget=5, n_retain=4, seed=1)
    subj = lambda xs: {x["subject"] if "subject" in x else x["requested_rewrite"]["subject"] for x in xs}  # noqa: E731
    sets = [subj(t["edit"]), subj(t["forget"]), subj(t["retain"]), subj(t["remaining"])]
    assert [len(x) for x in sets[:3]] == [5, 5, 4] and len(sets[3]) == 24 - 14
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    shared = set(t["relations"]["edit"]) & set(t["relations"]["forget"])
    assert shared if setting == "in" else not shared
    for f in t["forget"]:
        assert f["answer"] not in f["perturbed"] and len(f["perturbed"]) >= 1
    with pytest.raises(loka.LokaError, match="fewer"):
        build_tasks(_records(), setting, n_edit=30, n_forget=30, n_retain=1)


def test_joint_metrics_have_the_six_loka_names(tiny):
    from loka.bench.tasks import build_tasks

    t = build_tasks(_records(2, 4), "in", n_edit=2, n_forget=2, n_retain=1)
    m = M.joint_metrics(tiny, t, max_new_tokens=3)
    assert set(m) == {"unl-tr", "unl-rl", "edt-rl", "edt-prl", "rem-tr", "rem-rl"}
    assert (
        0 < m["unl-tr"] <= 1 and 0 <= m["rem-tr"] <= 1 and all(0 <= m[k] <= 1 for k in m if k.endswith("rl"))
    )


def test_cli_data_tasks_writes_files_the_readers_accept(tmp_path, capsys):
    from loka.cli import main

    src = tmp_path / "cf.json"
    src.write_text(json.dumps(_records()))
    code = main(
        [
            "data",
            "tasks",
            "--from",
            str(src),
            "--setting",
            "out",
            "--n-edit",
            "4",
            "--n-forget",
            "4",
            "--n-retain",
            "3",
            "--out",
            str(tmp_path / "t"),
            "--json",
        ]
    )
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["forget"] == 4 and not set(info["relations"]["edit"]) & set(info["relations"]["forget"])
    forget = read_requests(tmp_path / "t" / "forget.jsonl", ForgetRequest)
    retain = read_requests(tmp_path / "t" / "retain.jsonl", RetainRequest)
    edits = read_requests(tmp_path / "t" / "edit.json")
    assert len(forget) == 4 and len(retain) == 3 and len(edits) == 4
    assert forget[0].paraphrases and all(isinstance(r, ForgetRequest) for r in forget)
