"""Shared-prefix scoring gives the same numbers as scoring full ``prompt + target`` rows."""

import pytest
import torch

import loka
from loka import scoring

from .conftest import TINY

PROMPTS = ["The Eiffel Tower is in", "Paris is the capital of", "The Eiffel Tower is in", "Hi"]
TARGETS = ["Rome", "France and more", "Paris", "x"]


@pytest.mark.parametrize("mode", ["packed", "flat", "cache"])
@pytest.mark.parametrize("name", TINY)
def test_shared_prefix_matches_full_rows(name, mode, monkeypatch):
    h = loka.load_model(name)
    full = scoring.score_targets(h, PROMPTS, TARGETS, mode="full")

    def no_fallback(*a, **k):
        raise AssertionError("fell back to full rows")

    monkeypatch.setattr(scoring, "_rows_full", no_fallback)  # the shared path must really be taken
    shared = scoring.score_targets(
        h, PROMPTS, TARGETS, batch_size=2, mode=mode
    )  # chunks split a repeated prompt
    for a, b in zip(full, shared):
        assert a["target_ids"] == b["target_ids"]
        assert a["argmax_ids"] == b["argmax_ids"]
        assert torch.allclose(torch.tensor(a["token_logprobs"]), torch.tensor(b["token_logprobs"]), atol=1e-4)


def test_target_logprobs_sums_token_logprobs():
    h = loka.load_model("tiny-llama")
    rows = scoring.target_logprobs(h, PROMPTS, TARGETS)
    toks = scoring.score_targets(h, PROMPTS, TARGETS)
    for r, t in zip(rows, toks):
        assert r["logprob"] == pytest.approx(sum(t["token_logprobs"]), abs=1e-5)
        assert r["prob"] == pytest.approx(torch.tensor(r["logprob"]).exp().item(), rel=1e-5)


def test_packing_splits_long_chunks():
    h = loka.load_model("tiny-llama")
    p_ids = [h.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    t_ids = [scoring._target_ids(h.tokenizer, t) for t in TARGETS[:2]]
    one = scoring._rows_packed(h, p_ids, t_ids, [0, 1])
    two = scoring._rows_packed(h, p_ids, t_ids, [0, 1], max_len=8)  # one prompt group per pack
    for a, b in zip(one, two):
        assert torch.allclose(a, b, atol=1e-4)


def test_several_records_in_one_call_score_like_one_at_a_time():
    from loka.eval.data import load_cases
    from loka.eval.metrics import score_case, score_cases

    from .conftest import DATA

    h = loka.load_model("tiny-llama")
    cases = load_cases(DATA / "counterfact_sample5.json", n=3)
    together = score_cases(h, cases)
    for c, t in zip(cases, together):
        alone = score_case(h, c)
        assert alone.keys() == t.keys()
        for g in alone:
            for w in alone[g]:
                for a, b in zip(alone[g][w], t[g][w]):
                    assert a["target_ids"] == b["target_ids"]
                    assert torch.allclose(
                        torch.tensor(a["token_logprobs"]), torch.tensor(b["token_logprobs"]), atol=1e-4
                    )


def test_packed_linear_weights_follow_every_edit():
    """The prepacked (oneDNN) weights used for scoring are refreshed when an artifact changes a weight."""
    from loka.fastlinear import packed_linears

    h = loka.load_model("tiny-llama")
    dense = scoring.score_targets(h, PROMPTS, TARGETS)  # the packed path

    def dense_ref():
        packed_linears(h).enabled = False  # plain F.linear
        try:
            return scoring.score_targets(h, PROMPTS, TARGETS)
        finally:
            packed_linears(h).enabled = True

    ref = dense_ref()
    for a, b in zip(ref, dense):
        assert torch.allclose(torch.tensor(a["token_logprobs"]), torch.tensor(b["token_logprobs"]), atol=1e-4)
    name = h.weight_name(1)
    art = loka.Artifact.create(
        {name: torch.randn_like(h.param(name)) * 0.5}, method="t", hparams={}, requests=[], handle=h
    )
    art.apply(h)
    edited, edited_ref = scoring.score_targets(h, PROMPTS, TARGETS), dense_ref()
    assert abs(edited[0]["token_logprobs"][0] - dense[0]["token_logprobs"][0]) > 1e-3  # the edit is seen
    for a, b in zip(edited_ref, edited):
        assert torch.allclose(torch.tensor(a["token_logprobs"]), torch.tensor(b["token_logprobs"]), atol=1e-4)
    art.revert(h)
    back = scoring.score_targets(h, PROMPTS, TARGETS)
    for a, b in zip(dense, back):
        assert torch.allclose(torch.tensor(a["token_logprobs"]), torch.tensor(b["token_logprobs"]), atol=1e-6)
    assert len(packed_linears(h)._packs) > 0
    assert all(k[0][1] >= 0 for k in packed_linears(h)._packs.values())


@pytest.mark.parametrize("pointwise", [True, False], ids=["dense-io", "onednn-io"])
def test_packed_linear_backward_matches_autograd(monkeypatch, pointwise):
    """Both kernels — oneDNN's dense-in/dense-out linear and the older convert-in/convert-out one
    (the fallback where a torch build lacks the first) — give F.linear's outputs and input gradients."""
    from loka import fastlinear
    from loka.fastlinear import PackedLinears

    if pointwise and not fastlinear._pointwise_ok():
        pytest.skip("this torch has no mkldnn._linear_pointwise")
    monkeypatch.setattr(fastlinear, "_POINTWISE", pointwise)
    lin = torch.nn.Linear(16, 8)
    lin.requires_grad_(False)
    x = torch.randn(3, 5, 16, requires_grad=True)
    ref = lin(x)
    (ref * torch.arange(8.0)).sum().backward()
    g_ref = x.grad.clone()
    x.grad = None
    with PackedLinears().active(lin, grad=True):
        y = lin(x)
    (y * torch.arange(8.0)).sum().backward()
    assert torch.allclose(y, ref, atol=1e-5) and torch.allclose(x.grad, g_ref, atol=1e-5)


def test_edits_with_and_without_packed_weights_agree(text_corpus):
    from loka.fastlinear import packed_linears

    h = loka.load_model("tiny-llama")
    hp = {"mom2_n_tokens": 500, "mom2_corpus": str(text_corpus), "v_steps": 5, "layer": 2}
    req = loka.EditRequest("{} is located in", "Eiffel Tower", "Rome")
    fast = loka.edit(h, req, "rome", hp, apply=False, progress=False)
    packed_linears(h).enabled = False
    plain = loka.edit(h, req, "rome", hp, apply=False, progress=False)
    w = h.weight_name(2)
    assert torch.allclose(fast.deltas[w], plain.deltas[w], rtol=1e-3, atol=1e-5)


def test_memit_sees_its_own_lower_layer_updates_on_packed_weights(text_corpus):
    """MEMIT edits layer ``l`` and then recomputes keys and residuals for ``l+1`` with the packed
    weights still active: the packed copy of the edited matrix must be refreshed mid-context (it was
    once bound at activation, and every layer above the first got a wrong update)."""
    from loka.fastlinear import packed_linears

    h = loka.load_model("tiny-llama")
    hp = {"mom2_n_tokens": 500, "mom2_corpus": str(text_corpus), "v_steps": 5, "layers": [0, 1]}
    reqs = [
        loka.EditRequest("{} is located in", "Eiffel Tower", "Rome"),
        loka.EditRequest("{} plays", "Lionel Messi", "basketball"),
    ]
    fast = loka.edit(h, reqs, "memit", hp, apply=False, progress=False)
    packed_linears(h).enabled = False
    try:
        plain = loka.edit(h, reqs, "memit", hp, apply=False, progress=False)
    finally:
        packed_linears(h).enabled = True
    for layer in (0, 1):
        w = h.weight_name(layer)
        assert torch.allclose(fast.deltas[w], plain.deltas[w], rtol=1e-3, atol=1e-5), layer


def test_packed_weights_refresh_inside_an_open_context():
    from loka.fastlinear import PackedLinears

    lin = torch.nn.Linear(8, 4, bias=False)
    lin.requires_grad_(False)
    x = torch.randn(3, 8)
    with PackedLinears().active(lin) as on:
        before = lin(x)
        lin.weight.add_(1.0)  # an in-place edit while the packed path is on
        after = lin(x)
    assert on
    assert torch.allclose(after, x @ lin.weight.T, atol=1e-5)
    assert not torch.allclose(after, before)


def test_bfloat16_value_search_runs_on_bfloat16_packed_weights(text_corpus):
    """``v_dtype="bfloat16"``: the search's matmuls use bfloat16 packed copies (not autocast), and
    the edit reaches the float32 search's loss and update size; a wrong v_dtype is refused by name."""
    from loka import fastlinear
    from loka.fastlinear import packed_linears

    if not fastlinear._POINTWISE:
        pytest.skip("bfloat16 packed matmuls need mkldnn._linear_pointwise")
    h = loka.load_model("tiny-llama")
    hp = {"mom2_n_tokens": 500, "mom2_corpus": str(text_corpus), "v_steps": 5, "layer": 1}
    req = loka.EditRequest("{} is located in", "Eiffel Tower", "Rome")
    full = loka.edit(h, req, "rome", hp, apply=False, progress=False)
    half = loka.edit(h, req, "rome", {**hp, "v_dtype": "bfloat16"}, apply=False, progress=False)
    assert any(dt == torch.bfloat16 for (_, dt) in packed_linears(h)._packs)
    # on a random tiny model the search's loss is nearly flat, so Adam's step direction follows rounding
    # (native avx512_bf16 dot products differ from emulated ones): compare what the search reached
    # (its loss and the size of the update), not the update's direction
    w = h.weight_name(1)
    (f,), (b,) = full.manifest["extra"]["per_request"], half.manifest["extra"]["per_request"]
    assert not torch.equal(half.deltas[w], full.deltas[w])
    assert abs(b["nll"] - f["nll"]) < 1e-2 and abs(b["delta_norm"] - f["delta_norm"]) < 0.1 * f["delta_norm"]
    with pytest.raises(loka.LokaError, match="v_dtype"):
        loka.edit(h, req, "rome", {**hp, "v_dtype": "float16"}, apply=False, progress=False)


def test_a_tree_path_holds_the_sequence_and_shares_its_prefix():
    from loka.packing import pack_trees

    a, b = [5, 6, 7], [5, 6, 9, 4]
    tree = pack_trees([[a], [b]], 16, 0)
    pa, pb = tree.path(0, a), tree.path(0, b)
    assert [int(tree.input_ids[r, c]) for r, c in pa] == a and [int(tree.input_ids[r, c]) for r, c in pb] == b
    assert pa[:2] == pb[:2] and pa[2] != pb[2]  # the shared "5 6" is one pair of nodes
    assert [int(tree.position_ids[r, c]) for r, c in pb] == [0, 1, 2, 3]


@pytest.mark.parametrize("name", TINY)
def test_token_tree_runs_shared_prefixes_once(name):
    """Prompts sharing a template, and targets sharing a first token, run their common prefix once,
    and every row still gets the logits of its own full ``prompt + target`` forward."""
    h = loka.load_model(name)
    prompts = [
        "The nationality of Ann Lee is",
        "The nationality of Bo Ek is",
        "The nationality of Ann Lee is",
    ]
    targets = ["New York City", "New Delhi", "Poland"]
    widths: list[int] = []
    hook = h.model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].numel()), with_kwargs=True
    )
    try:
        tree = scoring.score_targets(h, prompts, targets, mode="packed")
        flat = scoring.score_targets(h, prompts, targets, mode="flat")
    finally:
        hook.remove()
    tok = h.tokenizer
    p_ids = [tok(p)["input_ids"] for p in dict.fromkeys(prompts)]
    t_ids = [scoring._target_ids(tok, t) for t in targets]
    common = next(i for i, (a, b) in enumerate(zip(*p_ids)) if a != b)
    assert common >= 3
    assert widths[0] <= widths[1] - common  # the template ran once, not once per prompt
    full = scoring.score_targets(h, prompts, targets, mode="full")
    for a, b, c in zip(full, tree, flat):
        assert a["target_ids"] == b["target_ids"] == c["target_ids"]
        assert a["argmax_ids"] == b["argmax_ids"] == c["argmax_ids"]
        for x in (b, c):
            assert torch.allclose(
                torch.tensor(a["token_logprobs"]), torch.tensor(x["token_logprobs"]), atol=1e-4
            )
    assert t_ids[0][:5] == t_ids[1][:5]  # the two targets' branches share their first tokens too


def test_value_search_packs_only_the_blocks_it_replays(text_corpus):
    """A value search at layer ``l`` packs the matrices of blocks ``l..L-1`` and the unembedding,
    ``Wᵀ`` only where gradients flow (above δ); the blocks below run on the model's own weights. A bfloat16
    search of one request leaves no float32 copies behind (ROME's peak memory on SmolLM2)."""
    from loka import fastlinear
    from loka.fastlinear import packed_linears

    h = loka.load_model("tiny-llama")
    layer = 1
    hp = {"mom2_n_tokens": 500, "mom2_corpus": str(text_corpus), "v_steps": 3, "layer": layer}
    req = loka.EditRequest("{} is located in", "Eiffel Tower", "Rome")
    ids = lambda blocks: {  # noqa: E731
        id(m) for i in blocks for m in h.block(i).modules() if type(m) is torch.nn.Linear
    }
    lower, upper = ids(range(layer)), ids(range(layer, h.n_layers)) | {id(h.module(h.spec.unembed))}
    cache = packed_linears(h)
    cache._packs.clear()
    loka.edit(h, req, "rome", hp, apply=False, progress=False)
    packed = {mid: wt is not None for (mid, _), (_, (_, _, wt, _)) in cache._packs.items()}
    assert packed and not set(packed) & lower and set(packed) <= upper
    # δ enters at block l's MLP output: only the matrices above it pass gradients to their input
    assert {m for m, wt in packed.items() if wt} == upper - ids([layer])
    if fastlinear._POINTWISE:
        cache._packs.clear()
        loka.edit(h, req, "rome", {**hp, "v_dtype": "bfloat16"}, apply=False, progress=False)
        assert {dt for (_, dt) in cache._packs} == {torch.bfloat16}
