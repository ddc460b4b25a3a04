"""UltraEdit: the closed form, the lifelong normalisation, the edit on every tiny family, sequential
state and rollback."""

import pytest
import torch

import loka
from loka.methods.ultraedit import Normaliser, clip_gradients, keys_and_gradients, solve_shift
from loka.models.catalog import TINY_NAMES
from loka.scoring import target_logprobs

from .conftest import DATA


@pytest.fixture(scope="module")
def reqs():
    return loka.read_requests(DATA / "counterfact_sample5.json")


def test_the_closed_form_is_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    K, V = torch.randn(40, 12, generator=g), torch.randn(40, 7, generator=g)
    for lam in (1.0, 0.3):
        # min ‖KΔ − V‖² + λ‖Δ‖²  ==  least squares on [K; √λ I] Δ = [V; 0]
        A = torch.cat([K, lam**0.5 * torch.eye(12)]).double()
        B = torch.cat([V, torch.zeros(12, 7)]).double()
        direct = torch.linalg.lstsq(A, B).solution
        assert torch.allclose(solve_shift(K, V, lam), direct, atol=1e-10)


def test_the_normaliser_updates_exactly_as_specified():
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randn(n, 5, generator=g) * (i + 1) + i for i, n in enumerate((7, 3, 11, 1))]
    nm = Normaliser.empty(5)
    for b in blocks:
        nm.update(b)
    x = torch.cat(blocks).double()
    assert nm.n == len(x)
    assert torch.allclose(nm.mean, x.mean(0), atol=1e-12)
    # Chan's parallel update adds N·s² per block where the exact sum of squares has (N−1)·s²: S is the
    # exact sum of squared deviations plus each block's unbiased variance (0 for a one-row block)
    extra = sum(b.double().var(0) for b in blocks if len(b) > 1)
    assert torch.allclose(nm.var, ((x - x.mean(0)) ** 2).sum(0) + extra, atol=1e-9)
    eps = torch.finfo(torch.float32).eps
    assert torch.allclose(nm.std, (nm.var / (len(x) - 1 + eps)).sqrt())
    z = torch.randn(4, 5, generator=g)
    assert torch.allclose(nm(z).double(), (z.double() - nm.mean) / (nm.std + eps), atol=1e-6)
    assert torch.equal(Normaliser.from_tensor(nm.to_tensor()).to_tensor(), nm.to_tensor())


def test_gradient_clip_shortens_only_the_outlier_rows():
    g = torch.Generator().manual_seed(2)
    K = torch.randn(9, 4, generator=g)
    G = torch.randn(9, 3, generator=g)
    G[4] *= 100.0  # one request far from its answer
    rows = {7: [(K[:5], G[:5].clone()), (K[5:], G[5:].clone())]}
    assert clip_gradients(rows, 3.0) == {"7": 1}
    got = torch.cat([b for _, b in rows[7]])
    cap = 3.0 * float(G.norm(dim=1).median())
    assert abs(float(got[4].norm()) - cap) < 1e-4 * cap  # scaled down to the cap ...
    assert torch.allclose(got[4] / got[4].norm(), G[4] / G[4].norm())  # ... keeping its direction
    keep = torch.arange(9) != 4
    assert torch.equal(got[keep], G[keep])  # the others untouched
    assert torch.equal(torch.cat([k for k, _ in rows[7]]), K)


def test_gradient_clip_reaches_the_update(reqs):
    h = loka.load_model("tiny-llama")
    hp = {"layers": [3], "lr": 1e-3, "batch_size": 2}
    plain = loka.edit(h, list(reqs), "ultraedit", hp, apply=False)
    clipped = loka.edit(h, list(reqs), "ultraedit", {**hp, "grad_clip": 1.0}, apply=False)
    (name,) = plain.deltas
    assert not torch.allclose(plain.deltas[name], clipped.deltas[name])  # rows above the median were cut


def test_the_update_is_the_specified_solve_on_the_captured_rows(reqs):
    """Recomputed from the keys and gradients with plain formulas, the weight shift is the artifact's."""
    h = loka.load_model("tiny-llama")
    layer, lr = 3, 1e-3
    rows = keys_and_gradients(h, list(reqs), [layer], batch_size=2)[layer]
    Z = torch.cat([torch.cat([k, g], -1) for k, g in rows]).double()
    # statistics over this turn only: blockwise as specified (checked above), then normalise
    nm = Normaliser.empty(Z.shape[1])
    for k, g in rows:
        nm.update(torch.cat([k, g], -1))
    zh = (Z - nm.mean) / (nm.std + torch.finfo(torch.float32).eps)
    d_in = rows[0][0].shape[1]
    V = -lr * (zh[:, :d_in] ** 2).sum(1, keepdim=True) * zh[:, d_in:]
    K = Z[:, :d_in]
    expect = torch.linalg.solve(K.T @ K + torch.eye(d_in, dtype=torch.float64), K.T @ V)
    art = loka.edit(h, list(reqs), "ultraedit", {"layers": [layer], "lr": lr, "batch_size": 2}, apply=False)
    got = art.deltas[h.spec.mlp_out_weight(layer)].double()
    assert torch.allclose(got, expect.T, atol=1e-5 * float(expect.abs().max()))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_an_edit_raises_the_target_and_reverts_bit_for_bit(name, reqs):
    h = loka.load_model(name)
    batch = list(reqs[:3])
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    p0 = [x["prob"] for x in target_logprobs(h, [r.text for r in batch], [r.target_new for r in batch])]
    art = loka.edit(h, batch, "ultraedit", {"lr": 1e-3}, progress=False)
    p1 = [x["prob"] for x in target_logprobs(h, [r.text for r in batch], [r.target_new for r in batch])]
    assert all(b > 3 * a for a, b in zip(p0, p1)), (p0, p1)
    assert art.kind == "weight-delta" and set(art.deltas) == {
        h.spec.mlp_out_weight(layer) for layer in art.manifest["extra"]["layers"]
    }
    art.revert(h)
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())


def test_statistics_carry_over_turns_and_roll_back(reqs):
    h = loka.load_model("tiny-llama")
    hp = {"layers": [3], "lr": 1e-3}
    st = loka.EditState()
    a1 = loka.edit(h, list(reqs[:2]), "ultraedit", hp, state=st, progress=False)
    after_one = st.copy()
    a2 = loka.edit(h, list(reqs[2:]), "ultraedit", hp, state=st, progress=False)
    n1, n2 = (a.manifest["extra"]["normaliser_rows"] for a in (a1, a2))
    (shape,) = n1
    assert n2[shape] == n1[shape] + a2.manifest["extra"]["rows"]["3"]  # never reset between turns
    a2.revert(h)
    a1.revert(h)
    # the second turn on fresh statistics differs from the same turn after the first
    a1.apply(h)
    fresh = loka.edit(h, list(reqs[2:]), "ultraedit", hp, apply=False, progress=False)
    w = h.spec.mlp_out_weight(3)
    assert not torch.equal(fresh.deltas[w], a2.deltas[w])
    # rollback to one batch: the statistics are exactly those after the first batch, so redoing the
    # second batch gives the same update
    st.truncate(1)
    assert st.batches == 1 and all(
        torch.equal(st.tensors[k], after_one.tensors[k]) for k in after_one.tensors
    )
    again = loka.edit(h, list(reqs[2:]), "ultraedit", hp, state=st, apply=False, progress=False)
    assert torch.equal(again.deltas[w], a2.deltas[w])
    a1.revert(h)


def test_a_diverging_turn_is_refused_with_the_weights_untouched(reqs):
    h = loka.load_model("tiny-llama")
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    with pytest.raises(loka.LokaError, match="ultraedit"):
        loka.edit(h, list(reqs), "ultraedit", {"lr": 1e12}, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())


def test_a_session_keeps_the_statistics_across_restarts_and_rollback(reqs, tmp_path):
    h = loka.load_model("tiny-llama")
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    hp = {"layers": [3], "lr": 1e-3}
    s = loka.Session(tmp_path / "s", h, method="ultraedit", hparams=hp)
    s.append(list(reqs[:2]), progress=False)
    after_one = {k: v.clone() for k, v in s.state.tensors.items()}
    s.append(list(reqs[2:4]), progress=False)
    s.close()
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())
    s = loka.Session(tmp_path / "s", h)  # a new process would do the same: the state comes from disk
    assert s.state.batches == 2 and len(s.state.tensors) == 2
    s.rollback_last(1)
    assert s.state.batches == 1 and set(s.state.tensors) == set(after_one)
    assert all(torch.equal(s.state.tensors[k], after_one[k]) for k in after_one)
    s.close()
