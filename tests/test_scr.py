"""SCR: a fact store as a context artifact — retrieval, in-context prompts, apply/revert, no weight change."""

import torch

import loka
from loka.artifact import applied_context
from loka.methods.scr import contextualise

REQ = loka.EditRequest("{} is located in the city of", "Eiffel Tower", "Rome")
REQ2 = loka.EditRequest("{} plays the sport of", "Lionel Messi", "tennis")
NONE = {"filter": "none", "min_similarity": 0.6}


def test_store_prepends_the_retrieved_fact_and_changes_no_weight(tmp_path):
    h = loka.load_model("tiny-llama")
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    q = [
        "Eiffel Tower is located in the city of",
        "Where is the Eiffel Tower? It is in the city of",
        "Lionel Messi plays the sport of",
        "The weather today is",
    ]
    plain = loka.target_logprobs(h, q, ["Rome"] * 4)
    art = loka.edit(h, [REQ, REQ2], "scr", NONE, progress=False)
    assert art.kind == "context" and applied_context(h.model) == [art]
    got = contextualise(h, q)
    assert got[0] == "Eiffel Tower is located in the city of Rome.\nEiffel Tower is located in the city of"
    assert got[1].startswith(
        "Eiffel Tower is located in the city of Rome.\n"
    )  # a paraphrase retrieves it too
    assert got[2].startswith("Lionel Messi plays the sport of tennis.\n")
    assert got[3] == q[3]  # nothing similar enough: the prompt is left alone
    inctx = loka.target_logprobs(h, q, ["Rome"] * 4)
    assert abs(inctx[0]["logprob"] - plain[0]["logprob"]) > 1e-2  # answered in context
    assert abs(inctx[3]["logprob"] - plain[3]["logprob"]) < 1e-4  # packed with other rows: float noise only
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())
    art.save(tmp_path / "s.loka")
    art.revert(h)
    assert applied_context(h.model) == []
    assert abs(loka.target_logprobs(h, q[:1], ["Rome"])[0]["logprob"] - plain[0]["logprob"]) < 1e-4
    back = loka.load_artifact(tmp_path / "s.loka").apply(h)
    assert contextualise(h, q[:1]) == got[:1]
    back.revert(h)


def test_newer_fact_for_the_same_prompt_supersedes_and_prune_is_refused():
    h = loka.load_model("tiny-llama")
    a = loka.edit(h, REQ, "scr", NONE, progress=False)
    b = loka.edit(h, loka.EditRequest(REQ.prompt, REQ.subject, "Berlin"), "scr", NONE, progress=False)
    assert contextualise(h, [REQ.text])[0].startswith("Eiffel Tower is located in the city of Berlin.\n")
    assert "Rome" not in contextualise(h, [REQ.text])[0]
    b.revert(h)
    assert contextualise(h, [REQ.text])[0].startswith("Eiffel Tower is located in the city of Rome.\n")
    a.revert(h)
    try:
        loka.edit(h, REQ, "scr", NONE, prune=2.0, progress=False)
    except loka.LokaError as e:
        assert "changes no weights" in str(e)
    else:
        raise AssertionError("prune on a context method must be refused")
    try:
        loka.stack_artifacts([a])
    except loka.ArtifactError as e:
        assert "weight-delta" in str(e)
    else:
        raise AssertionError("stacking a context artifact must be refused")


def test_model_filter_asks_the_model(monkeypatch):
    import loka.methods.scr as scr

    h = loka.load_model("tiny-llama")
    art = loka.edit(h, REQ, "scr", {"filter": "model", "min_similarity": 0.6}, progress=False)
    asked = []
    real = scr.RELEVANCE

    def spy(*a, **k):
        asked.append(a[1])
        assert k.get("context") is False  # the relevance question is never itself contextualised
        return [{"logprob": 0.0 if t == "Yes" else -1.0} for t in a[2]]

    monkeypatch.setattr("loka.scoring.target_logprobs", spy)
    out = contextualise(h, [REQ.text])
    assert asked and asked[0][0] == real.format(
        fact="Eiffel Tower is located in the city of Rome.", query=REQ.text
    )
    assert out[0].startswith("Eiffel Tower is located in the city of Rome.\n")  # the model said yes
    monkeypatch.setattr(
        "loka.scoring.target_logprobs",
        lambda *a, **k: [{"logprob": -1.0 if t == "Yes" else 0.0} for t in a[2]],
    )
    assert contextualise(h, [REQ.text]) == [REQ.text]  # the model said no: the prompt is left alone
    art.revert(h)
