"""Real weights: ROME and MEMIT on SmolLM2-135M (statistics from the bundled TOFU text, for speed)."""

import pytest
import torch

import loka

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hp(text_corpus):
    return {"mom2_corpus": str(text_corpus), "mom2_n_tokens": 5000}


def _top(h, prompt):
    return loka.target_logprobs(h, [prompt], ["x"])[0]["top_token"]


def test_rome_edit_changes_the_answer_generalises_and_keeps_other_facts(
    smollm2, hp, request_eiffel, tmp_path
):
    h = smollm2
    original = {k: v.clone() for k, v in h.model.state_dict().items()}
    other = "The capital of France is"
    assert _top(h, other) == " Paris"
    para = request_eiffel.paraphrases[0]
    p_para_before = loka.target_logprobs(h, [para], ["Rome"])[0]["prob"]
    art = loka.edit(h, request_eiffel, "rome", hp, progress=False)
    try:
        assert _top(h, request_eiffel.text) == " Rome"
        p_para_after = loka.target_logprobs(h, [para], ["Rome"])[0]["prob"]
        assert p_para_after > 5 * p_para_before
        assert _top(h, other) == " Paris"
        enc = h.tokenizer([request_eiffel.text, other, para], return_tensors="pt", padding=True)
        edited = h.model(**enc).logits
        art.save(tmp_path / "e.loka")
    finally:
        art.revert(h)
    assert all(torch.equal(v, original[k]) for k, v in h.model.state_dict().items())
    assert _top(h, request_eiffel.text) != " Rome"
    loaded = loka.load_artifact(tmp_path / "e.loka")
    loaded.apply(h)
    try:
        assert torch.equal(h.model(**enc).logits, edited)
    finally:
        loaded.revert(h)
    assert all(torch.equal(v, original[k]) for k, v in h.model.state_dict().items())


def test_memit_batch_edits_each_fact(smollm2, hp):
    h = smollm2
    reqs = [
        loka.EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
        loka.EditRequest("{} plays the sport of", "Lionel Messi", "basketball"),
        loka.EditRequest("{} was developed by", "Windows 95", "Apple"),
    ]
    before = [
        r["prob"] for r in loka.target_logprobs(h, [r.text for r in reqs], [r.target_new for r in reqs])
    ]
    art = loka.edit(h, reqs, "memit", hp, progress=False)
    try:
        after = loka.target_logprobs(h, [r.text for r in reqs], [r.target_new for r in reqs])
        for b, a in zip(before, after):
            assert a["prob"] > 10 * b and a["prob"] > 0.2
    finally:
        art.revert(h)


def test_subject_that_is_not_a_token_span_is_refused(smollm2):
    with pytest.raises(loka.RequestError, match="not found as a token span"):
        loka.edit(smollm2, loka.EditRequest("The {}er is tall", "Tow", "x"), "rome", progress=False)


def test_batched_values_with_early_stopping_match_one_by_one(smollm2, hp):
    """Requests in one batch are optimised independently: converged ones are frozen and dropped."""
    from loka.methods.locate import optimize_values
    from loka.methods.templates import context_templates

    h = smollm2
    reqs = [
        loka.EditRequest("{} is located in the city of", "Eiffel Tower", "Rome"),
        loka.EditRequest("{} plays the sport of", "Lionel Messi", "basketball"),
    ]
    # float32: the batched and the single search round differently in bfloat16 (other shapes)
    rome = loka.default_hparams("rome", h, {**hp, "v_dtype": "float32"})
    tm = context_templates(h)
    both = optimize_values(h, reqs, rome.layer, tm, rome)
    for i, r in enumerate(reqs):
        alone = optimize_values(h, [r], rome.layer, tm, rome)
        assert both.nll[i] < rome.early_stop_loss
        assert torch.allclose(
            both.targets[i], alone.targets[0], rtol=1e-3, atol=1e-3 * float(alone.targets[0].norm())
        )
