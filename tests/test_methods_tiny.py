"""ROME and MEMIT on every tiny architecture: the algebra holds whatever the storage layout."""

import numpy as np
import pytest
import torch

import loka
from loka.methods.locate import Replay, build_prompts, module_io_at_lookup, prompt_forward
from loka.methods.memit import memit_solve
from loka.methods.templates import context_templates

from .conftest import TINY

REQ = loka.EditRequest("{} is located in the city of", "Eiffel Tower", "Rome")


@pytest.fixture(params=TINY)
def tiny(request, text_corpus):
    h = loka.load_model(request.param)
    h.hp = {"mom2_n_tokens": 1000, "mom2_corpus": str(text_corpus), "v_steps": 10}
    return h


@pytest.mark.parametrize("align", [False, True])
def test_replay_reproduces_the_full_forward(tiny, align):
    reqs = [REQ, loka.EditRequest("The sport {} plays is", "Lionel Messi", "tennis")]
    batch = build_prompts(tiny, reqs, context_templates(tiny), align=align)
    plain = build_prompts(tiny, reqs, context_templates(tiny))
    ref = prompt_forward(tiny, plain).logits[
        plain.tgt_rows, plain.tgt_cols
    ]  # unpadded positions, no alignment
    for start, tree in ((0, True), (2, True), (3, True), (2, False)):
        rep = Replay(tiny, batch, start, prefix_tree=tree)
        assert (rep.split is not None) == align  # the suffix-only path is really taken
        # the shared prefixes ran once, as token trees, wherever the cache is a plain full-attention one
        assert rep.prefix_packed == (tree and align and tiny.name != "tiny-gemma3")
        for _ in range(2):  # the cache is cropped back between replays
            got = rep.logits_at(batch.tgt_rows, batch.tgt_cols)
            assert torch.allclose(got, ref, atol=1e-4)
        sub = rep.subset(torch.tensor([0, 2, 3]))
        keep = torch.isin(batch.tgt_rows, torch.tensor([0, 2, 3]))
        new_rows = torch.tensor([0, -1, 1, 2])[batch.tgt_rows[keep]]
        assert torch.allclose(sub.logits_at(new_rows, batch.tgt_cols[keep]), ref[keep], atol=1e-4)


def test_rome_is_rank_one_and_maps_the_key_to_the_new_value(tiny):
    art = loka.edit(tiny, REQ, "rome", {**tiny.hp, "layer": 1}, progress=False)
    ((name, delta),) = art.deltas.items()
    assert name == tiny.weight_name(1)
    assert delta.shape == tiny.param(name).shape  # stored orientation (transposed for Conv1D)
    s = torch.linalg.svdvals(delta)
    assert s[1] < 1e-5 * s[0]
    # Ŵ k = v*: the edited module now outputs the optimised value at the subject's last token
    batch = build_prompts(tiny, [REQ], ["{}"], with_targets=False, kl_prompts=())
    io = module_io_at_lookup(tiny, batch, [1])
    art.revert(tiny)
    from loka.methods.locate import optimize_values

    hp = loka.default_hparams("rome", tiny, {**tiny.hp, "layer": 1})
    vr = optimize_values(tiny, [REQ], 1, context_templates(tiny), hp)
    assert torch.allclose(io["values"][1][0], vr.targets[0], atol=1e-4 * vr.targets[0].norm())


def test_rome_update_in_out_orientation_matches_weight_view(tiny):
    art = loka.edit(tiny, REQ, "rome", {**tiny.hp, "layer": 2}, progress=False)
    ((name, delta),) = art.deltas.items()
    art.revert(tiny)
    w0 = tiny.weight(2).clone()  # (out, in) view
    art.apply(tiny)
    d_view = tiny.weight(2) - w0
    expected = delta.T if tiny.spec.transposed else delta
    assert torch.allclose(d_view, expected, atol=1e-6)
    # the (out, in) delta acts on keys: ΔW k changes the module output by exactly ΔW k
    k = torch.randn(d_view.shape[1])
    mod = tiny.mlp_out(2)
    art.revert(tiny)
    y0 = mod(k[None])[0]
    art.apply(tiny)
    assert torch.allclose(mod(k[None])[0] - y0, d_view @ k, atol=1e-4)


def test_rome_update_solves_with_the_statistics_it_is_given():
    """ROME's ``u ∝ C⁻¹k*`` (solved through a factorisation cached by content) maps the plain key to
    the target, and a changed ``C`` — even in place — is never answered from the cache."""
    from loka.methods.rome import rome_update

    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 40, generator=g)
    C = A @ A.T / 40
    ks, k, vt, vc = (torch.randn(n, generator=g) for n in (12, 12, 5, 5))
    for _ in range(2):  # the second call hits the cache
        dW = rome_update(ks, k, vt, vc, C)
        u = torch.linalg.solve(C.double(), ks.double())
        assert torch.allclose(
            dW.double(),
            torch.outer((vt - vc).double() / (k.double() @ u / u.norm()), u / u.norm()),
            atol=1e-5,
        )
        assert torch.allclose(dW @ k, vt - vc, atol=1e-4)
    C.mul_(2.0).add_(torch.eye(12))  # same tensor, new content
    u2 = torch.linalg.solve(C.double(), ks.double())
    assert torch.allclose(
        rome_update(ks, k, vt, vc, C).double(),
        torch.outer((vt - vc).double() / (k.double() @ u2 / u2.norm()), u2 / u2.norm()),
        atol=1e-5,
    )


def test_memit_solution_matches_a_direct_least_squares_solve():
    torch.manual_seed(0)
    d_in, d_out, n, lam = 12, 7, 5, 3.0
    K, R = torch.randn(n, d_in), torch.randn(n, d_out)
    A = torch.randn(40, d_in)
    C = A.T @ A / 40
    dW = memit_solve(K, R, C, lam)
    # min ‖ΔW Kᵀ − Rᵀ‖² + λ tr(ΔW C ΔWᵀ)  ⇔  stacked least squares [Kᵀ, √λ C^{1/2}]
    evals, evecs = np.linalg.eigh(C.double().numpy())
    C_half = evecs @ np.diag(np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    M = np.concatenate([K.double().numpy(), np.sqrt(lam) * C_half], 0)  # (n + d_in) × d_in
    Y = np.concatenate([R.double().numpy(), np.zeros((d_in, d_out))], 0)
    direct = np.linalg.lstsq(M, Y, rcond=None)[0].T
    assert np.allclose(dW.double().numpy(), direct, atol=1e-5)


def test_memit_edits_several_layers_with_finite_updates(tiny):
    reqs = [REQ, loka.EditRequest("{} plays the sport of", "Messi", "tennis")]
    art = loka.edit(tiny, reqs, "memit", {**tiny.hp, "layers": [1, 2]}, progress=False)
    assert set(art.deltas) == {tiny.weight_name(1), tiny.weight_name(2)}
    for d in art.deltas.values():
        assert torch.isfinite(d).all() and d.norm() > 0
        assert torch.linalg.matrix_rank(d.double(), atol=1e-6 * float(d.norm())) <= len(reqs)


class _FreshForwards:
    """The straightforward key passes: a whole forward per layer (what _KeyPasses replaces)."""

    def __init__(self, handle, batch, layers):
        self.handle, self.batch, self.layers = handle, batch, layers

    def run(self, i):
        return module_io_at_lookup(self.handle, self.batch, [self.layers[i]], block_out_layer=self.layers[-1])


def test_memit_key_passes_replayed_from_the_last_edited_block_equal_fresh_forwards(tiny, monkeypatch):
    """MEMIT's per-layer key/residual passes start at the last edited block's stored input; the
    updates equal those of a fresh forward per layer (layers with a gap, on every family)."""
    from loka.methods import memit

    reqs = [REQ, loka.EditRequest("{} plays the sport of", "Messi", "tennis")]
    hp = {**tiny.hp, "layers": [0, 1, 3], "v_steps": 3}
    fast = loka.edit(tiny, reqs, "memit", hp, apply=False, progress=False)
    monkeypatch.setattr(memit, "_KeyPasses", _FreshForwards)
    plain = loka.edit(tiny, reqs, "memit", hp, apply=False, progress=False)
    for name, d in plain.deltas.items():
        assert torch.allclose(fast.deltas[name], d, rtol=1e-4, atol=1e-6), name


def test_token_tree_key_batch_gives_the_padded_batch_keys(tiny):
    """MEMIT's keys-only prompts packed as token trees (shared template prefixes run once) give the
    keys and block outputs of the padded batch, on every family; the trees really are smaller."""
    from loka.methods.locate import build_prompts, tree_batch

    reqs = [
        REQ,
        loka.EditRequest("{} plays the sport of", "Messi", "tennis"),
        loka.EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ]
    templates = ["{}", "The story goes. {}", "The story goes on. {}", "In 1990, {}"]
    padded = build_prompts(tiny, reqs, templates, with_targets=False, kl_prompts=())
    tree = tree_batch(padded, 0, torch.float32, max_len=64)  # small packs: several rows, shared prefixes
    assert tree.input_ids.shape[0] > 1
    assert int((tree.input_ids != 0).sum()) < int(padded.attention_mask.sum())
    a = module_io_at_lookup(tiny, padded, [0, 2], block_out_layer=3)
    b = module_io_at_lookup(tiny, tree, [0, 2], block_out_layer=3)
    for part in ("keys", "values"):
        for layer in (0, 2):
            assert torch.allclose(a[part][layer], b[part][layer], atol=1e-5), (part, layer)
    assert torch.allclose(a["block_out"], b["block_out"], atol=1e-5)


def test_rome_raises_the_target_on_a_tiny_model(tiny):
    # a random model has tiny gradients: without the decay term and with a large clamp the target must rise
    req = loka.EditRequest(REQ.prompt, REQ.subject, "R")  # " R": two byte tokens
    before = loka.target_logprobs(tiny, [req.text], [req.target_new])[0]["logprob"]
    loka.edit(
        tiny,
        req,
        "rome",
        {
            **tiny.hp,
            "layer": 2,
            "clamp_norm_factor": 50.0,
            "v_steps": 30,
            "v_weight_decay": 0.0,
            "kl_factor": 0.0,
        },
        progress=False,
    )
    after = loka.target_logprobs(tiny, [req.text], [req.target_new])[0]["logprob"]
    # logits of a random model behind its final norm are bounded: the search saturates at a rise of
    # ~0.5 nat (tiny-gemma3, tiny-neox) to ~1.4 nat (tiny-gpt2); 0.3 is a clear rise on every family
    assert after > before + 0.3


def test_residual_maps_through_a_post_mlp_norm():
    """Gemma's post-MLP RMSNorm: the mapped change moves the normalised output by r (first order)."""
    from loka.methods.memit import through_post_norm

    h = loka.load_model("tiny-gemma3")
    norm = h.module(f"{h.spec.block_path(1)}.{h.spec.post_mlp_norm}")
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)  # a non-trivial gain
    g = torch.Generator().manual_seed(0)
    m, v = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    errs = []
    for eps in (1e-2, 1e-3):
        r = (norm(m + eps * v) - norm(m)).detach()  # reachable: the output of a nearby pre-norm vector
        d = through_post_norm(norm, m, r)
        errs.append(float((norm(m + d) - norm(m) - r).norm() / r.norm()))
        assert float((norm(m + r) - norm(m) - r).norm() / r.norm()) > 0.1  # adding r itself is wrong
    assert errs[0] < 0.05 and errs[1] < errs[0] / 5  # first order: the relative error shrinks with r


def test_memit_reaches_its_target_through_gemmas_post_norm(text_corpus):
    h = loka.load_model("tiny-gemma3")
    req = loka.EditRequest(REQ.prompt, REQ.subject, "R")
    before = loka.target_logprobs(h, [req.text], [req.target_new])[0]["logprob"]
    loka.edit(
        h,
        req,
        "memit",
        {
            "mom2_n_tokens": 1000,
            "mom2_corpus": str(text_corpus),
            "layers": [1, 2],
            "v_steps": 30,
            "clamp_norm_factor": 50.0,
            "v_weight_decay": 0.0,
            "kl_factor": 0.0,
            "mom2_update_weight": 1.0,
        },
        progress=False,
    )
    after = loka.target_logprobs(h, [req.text], [req.target_new])[0]["logprob"]
    assert after > before + 0.5


def test_grouped_value_search_equals_the_single_padded_batch(tiny, monkeypatch):
    """Rows grouped by template or by suffix length (less padding) give the same optimised values as
    one padded batch."""
    from loka.methods import locate
    from loka.methods.locate import optimize_values

    reqs = [
        REQ,
        loka.EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
        loka.EditRequest("{} was made by", "the iPhone 5 camera", "Nokia"),
    ]
    tm = context_templates(tiny)
    out = {}
    monkeypatch.setattr(locate.grouping, "GROUP_COST_COLUMNS", 0)  # "suffix": one bucket per suffix length
    lens = {locate.suffix_len(tiny.tokenizer, r) for r in reqs}
    assert (
        len(locate.suffix_buckets([locate.suffix_len(tiny.tokenizer, r) for r in reqs], 6)) == len(lens) > 1
    )
    for mode in ("none", "template", "kl", "suffix"):
        hp = loka.default_hparams("rome", tiny, {**tiny.hp, "layer": 1, "v_grouping": mode, "v_steps": 6})
        out[mode] = optimize_values(tiny, reqs, 1, tm, hp)
    a = out["none"]
    for b in (out["template"], out["kl"], out["suffix"]):
        for name in ("init", "keys", "plain_keys"):
            assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
        assert torch.allclose(a.targets, b.targets, atol=1e-4 * float(a.targets.norm()))
        assert a.nll == pytest.approx(b.nll, rel=1e-3, abs=1e-5)


def test_suffix_buckets_are_optimal_and_cover_every_request():
    """The dynamic programme's grouping costs no more than any contiguous split of the sorted lengths."""
    import itertools

    from loka.methods.locate import suffix_buckets

    lengths = [6, 2, 11, 4, 4, 7, 6, 10, 5, 6]
    cost = lambda gs: sum(8 + 3 * len(g) * max(lengths[i] for i in g) for g in gs)  # noqa: E731
    got = suffix_buckets(lengths, rows_per_request=3, group_cost=8)
    assert sorted(i for g in got for i in g) == list(range(len(lengths)))
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(
        cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
        for k in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), k)
    )
    assert cost(got) == best
    assert len(suffix_buckets(lengths, 3, group_cost=10_000)) == 1  # groups too dear: one padded group
    assert len(suffix_buckets(lengths, 3, group_cost=0)) == len(set(lengths))  # free: one per length


def test_v_beta1_is_the_value_search_momentum(text_corpus):
    """``v_beta1`` is Adam's β₁ in the value search: 0.9 is the reference search bit for bit, another
    value moves δ differently, and a value Adam cannot take (β₁ ≥ 1) is refused by name."""
    from loka.methods.locate import optimize_values

    h = loka.load_model("tiny-llama")
    base = {"mom2_n_tokens": 1000, "mom2_corpus": str(text_corpus), "v_steps": 4, "layer": 1}
    base["early_stop_loss"] = 0.0  # every step runs, so the momentum acts on steps 2-4
    tm = context_templates(h)
    run = lambda **kw: optimize_values(h, [REQ], 1, tm, loka.default_hparams("rome", h, {**base, **kw}))  # noqa: E731
    ref, same, low = run(), run(v_beta1=0.9), run(v_beta1=0.0)
    assert torch.equal(ref.targets, same.targets)
    assert not torch.allclose(ref.targets, low.targets)
    with pytest.raises(loka.LokaError, match="v_beta1"):
        loka.edit(h, REQ, "rome", {**base, "v_beta1": 1.0}, apply=False, progress=False)


def test_a_request_that_stops_takes_no_backward(text_corpus, monkeypatch):
    """A request whose NLL falls below ``early_stop_loss`` at a step is not back-propagated at that
    step (its gradient would be discarded): the same search, one backward fewer per stopping step."""
    import loka.methods.locate.values as values

    h = loka.load_model("tiny-llama")
    hp = loka.default_hparams(
        "rome",
        h,
        {"mom2_n_tokens": 1000, "mom2_corpus": str(text_corpus), "layer": 1, "v_steps": 20, "v_lr": 2.0},
    )
    tm = context_templates(h)
    calls = []
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda t, *a, **k: (calls.append(1), backward(t, *a, **k)))
    hp.early_stop_loss = 10.0  # stops wherever the first forward is: no backward at all
    first = values.optimize_values(h, [REQ], 1, tm, hp)
    assert first.steps == 1 and not calls
    hp.early_stop_loss = 0.0
    last = values.optimize_values(h, [REQ], 1, tm, hp).nll[0]
    hp.early_stop_loss = (first.nll[0] + last) / 2  # reached halfway through the search
    calls.clear()
    fast = values.optimize_values(h, [REQ], 1, tm, hp)
    n_fast = len(calls)
    search = values._search
    monkeypatch.setattr(values, "_search", lambda *a, **k: search(*a, **{**k, "whole_requests": False}))
    calls.clear()
    slow = values.optimize_values(h, [REQ], 1, tm, hp)
    assert 1 < fast.steps == slow.steps < 20  # it stopped early, at the same step
    assert n_fast == len(calls) - 2  # the loss's and the decay term's backward of the last step
    assert torch.allclose(fast.targets, slow.targets, atol=1e-6)


def test_the_kl_term_holds_the_unedited_distribution(text_corpus):
    """The KL term's reference is the unedited model's next-token distribution after "{subject} is a"
    (taken from the search's first step, where δ = 0): weighting it keeps the edited model closer to it."""
    h = loka.load_model("tiny-llama")
    hp = {"mom2_n_tokens": 1000, "mom2_corpus": str(text_corpus), "layer": 1, "v_steps": 10, "v_lr": 1.0}
    ids = h.tokenizer(f"{REQ.subject} is a", return_tensors="pt").input_ids

    def log_p():
        with torch.no_grad():
            return torch.log_softmax(h.model(ids).logits[0, -1], -1)

    p0 = log_p()
    kl = {}
    for factor in (0.0, 50.0):
        art = loka.edit(h, REQ, "rome", {**hp, "kl_factor": factor}, progress=False)
        lp = log_p()
        kl[factor] = float((lp.exp() * (lp - p0)).sum())
        art.revert(h)
    assert kl[50.0] < 0.5 * kl[0.0]
