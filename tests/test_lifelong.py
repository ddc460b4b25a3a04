"""AlphaEdit (null-space projection, past keys) and PRUNE (restrained accumulated spectrum)."""

import json
import math

import pytest
import torch

import loka
from loka.corpus import corpus_from_spec
from loka.methods.alphaedit import alphaedit_solve, nullspace_projection, past_key_name
from loka.methods.prune import prune_deltas, restrain
from loka.state import EditState

REQ_A = loka.EditRequest("{} is located in the city of", "Eiffel Tower", "Rome")
REQ_B = loka.EditRequest("The sport {} plays is", "Lionel Messi", "tennis")


@pytest.fixture
def hp(text_corpus):
    return {"mom2_n_tokens": 1000, "mom2_corpus": str(text_corpus), "v_steps": 10, "layers": [1, 2]}


def test_projection_removes_the_preserved_subspace():
    g = torch.Generator().manual_seed(0)
    K0 = torch.randn(200, 6, generator=g) @ torch.randn(6, 16, generator=g)  # preserved keys span 6 dims
    P, rank = nullspace_projection(K0.T @ K0 / 200, 1e-3)  # float32 C: its zeros are ~1e-6
    assert rank == 10
    assert torch.allclose(P @ P, P, atol=1e-5)  # a projection
    assert float((K0 @ P).norm() / K0.norm()) < 1e-4  # P k0 = 0


def test_alphaedit_closed_form_is_the_papers_formula():
    g = torch.Generator().manual_seed(1)
    K, R = torch.randn(4, 12, generator=g), torch.randn(4, 7, generator=g)
    Kp = torch.randn(5, 12, generator=g)
    P, _ = nullspace_projection(
        torch.diag(torch.tensor([1.0] * 4 + [0.0] * 8)), 0.5
    )  # null space: last 8 dims
    upd = alphaedit_solve(K, R, P, Kp.T @ Kp, 10.0).double()
    Pd, Kd, Rd, Kpd = P.double(), K.double().T, R.double().T, Kp.double().T
    # Eq. 9: ΔW = R K1ᵀ P (K_p K_pᵀ P + K1 K1ᵀ P + λ I)⁻¹  ⇔  ΔW (K_pK_pᵀP + K1K1ᵀP + λI) = R K1ᵀ P
    lhs = upd @ (Kpd @ Kpd.T @ Pd + Kd @ Kd.T @ Pd + 10.0 * torch.eye(12, dtype=torch.float64))
    assert torch.allclose(lhs, Rd @ Kd.T @ Pd, atol=1e-5)
    assert float((upd @ (torch.eye(12, dtype=torch.float64) - Pd)).norm()) < 1e-6  # nothing outside P's range


def test_alphaedit_update_spares_preserved_keys_and_raises_the_target(hp):
    h = loka.load_model("tiny-llama")
    C = loka.second_moments(h, [1], corpus_from_spec(hp["mom2_corpus"], h, 1000), 1000, progress=False)[1]
    evals, evecs = torch.linalg.eigh(C.double())
    thr = float(evals.median())  # half the key space is treated as preserved
    req = loka.EditRequest(REQ_A.prompt, REQ_A.subject, "R")
    before = loka.target_logprobs(h, [req.text], [req.target_new])[0]["logprob"]
    art = loka.edit(
        h,
        req,
        "alphaedit",
        {
            **hp,
            "layers": [1],
            "nullspace_threshold": thr,
            "L2": 0.01,
            "clamp_norm_factor": 50.0,
            "v_steps": 30,
            "v_weight_decay": 0.0,
            "kl_factor": 0.0,
        },
        progress=False,
    )
    after = loka.target_logprobs(h, [req.text], [req.target_new])[0]["logprob"]
    dW = art.deltas[h.weight_name(1)].double()  # llama stores (out, in)
    kept = evecs[:, evals >= thr]  # preserved directions
    assert float((dW @ kept).norm() / dW.norm()) < 1e-4
    assert art.manifest["extra"]["nullspace_rank"]["1"] == int((evals < thr).sum())
    assert after > before + 0.3


def test_alphaedit_past_keys_protect_earlier_edits(hp):
    h = loka.load_model("tiny-llama")
    state = EditState()
    thr = {"nullspace_threshold": 1e9, "L2": 1.0}  # P = I: isolate the effect of the past-key term
    a = loka.edit(h, REQ_A, "alphaedit", {**hp, **thr}, state=state, progress=False)
    name = past_key_name(h, 2)
    assert state.batches == 1 and [k.shape for k in state.batch_tensors(name)] == [(1, 128)]
    from loka.methods.locate import build_prompts, mean_over_templates, module_io_at_lookup
    from loka.methods.templates import context_templates

    kb = build_prompts(h, [REQ_A], context_templates(h), with_targets=False, kl_prompts=())
    kA = mean_over_templates(module_io_at_lookup(h, kb, [2])["keys"][2], kb, 1)[0].double()
    with_state = loka.edit(
        h, REQ_B, "alphaedit", {**hp, **thr}, state=state.copy(), apply=False, progress=False
    )
    without = loka.edit(h, REQ_B, "alphaedit", {**hp, **thr}, apply=False, progress=False)
    w = h.weight_name(2)
    hit = lambda art: float((art.deltas[w].double() @ kA).norm() / art.deltas[w].double().norm())  # noqa: E731
    assert hit(with_state) < 0.5 * hit(without)
    # accumulate_keys off: the earlier keys are ignored, as if the state were empty
    ablated = loka.edit(
        h,
        REQ_B,
        "alphaedit",
        {**hp, **thr, "accumulate_keys": False},
        state=state.copy(),
        apply=False,
        progress=False,
    )
    assert torch.allclose(
        ablated.deltas[w], without.deltas[w], atol=1e-6 * float(without.deltas[w].abs().max())
    )
    a.revert(h)


def test_prune_restraint_function():
    s = torch.tensor([0.5, 1.9, 2.0, 5.0, 50.0])
    f = restrain(s, 2.0)
    assert torch.equal(f[:2], s[:2])  # below σ_max: unchanged
    assert f[2] == pytest.approx(2.0)  # continuous at σ_max
    assert f[3] == pytest.approx(math.log(5.0) - math.log(2.0) + 2.0)
    assert f[4] == pytest.approx(math.log(50.0) - math.log(2.0) + 2.0)
    assert restrain(torch.tensor([8.0]), 2.0, alpha=2.0)[0] == pytest.approx(math.log2(8) - 1 + 2.0)


def test_prune_restrains_the_accumulated_update_and_stays_revertible(hp):
    h = loka.load_model("tiny-gpt2")  # transposed storage: the spectrum is orientation-free
    name = h.weight_name(2)
    w0 = h.param(name).detach().clone()
    smax = float(torch.linalg.matrix_norm(w0.double(), ord=2))
    state = EditState()
    big = {
        name: 3.0
        * smax
        * torch.outer(torch.randn(w0.shape[0]), torch.randn(w0.shape[1])).div(w0.shape[0] ** 0.5)
    }
    arts = []
    for _ in range(3):  # three large rank-one updates in a row
        d, info = prune_deltas(h, {k: v.clone() for k, v in big.items()}, state)
        state.meta["batches"] = state.batches + 1
        art = loka.Artifact.create(d, method="test", hparams={}, requests=[], handle=h)
        art.apply(h)
        arts.append(art)
        acc = (h.param(name).detach() - w0).double()
        assert torch.equal(state.get(f"prune.base.{name}"), w0)  # the original is kept once
        s_acc = float(torch.linalg.matrix_norm(acc, ord=2))
        assert s_acc == pytest.approx(info[name]["sigma_max_acc"], rel=1e-4)
        assert s_acc == pytest.approx(
            float(restrain(torch.tensor(info[name]["sigma_max_acc_raw"]), smax)), rel=1e-4
        )
        assert s_acc < info[name]["sigma_max_acc_raw"]
    for art in reversed(arts):
        art.revert(h)
    assert torch.equal(h.param(name), w0)


def test_edit_with_prune_records_it(hp):
    h = loka.load_model("tiny-llama")
    art = loka.edit(h, REQ_A, "memit", hp, prune=math.e, apply=False, progress=False)
    assert art.manifest["extra"]["prune_alpha"] == pytest.approx(math.e)
    assert set(art.manifest["extra"]["prune"]) == set(art.deltas)


def test_state_rollback_drops_later_batches_and_round_trips(tmp_path):
    st = EditState()
    for b in range(3):
        st.add_batch_tensor("keys", torch.full((1, 2), float(b)))
        st.set("base", torch.ones(2))
        st.meta["batches"] = b + 1
    assert [float(t[0, 0]) for t in st.batch_tensors("keys")] == [0.0, 1.0, 2.0]
    st.save(tmp_path / "s")
    back = EditState.load(tmp_path / "s")
    assert back.batches == 3 and torch.equal(back.get("base"), torch.ones(2))
    back.truncate(1)
    assert back.batches == 1 and [float(t[0, 0]) for t in back.batch_tensors("keys")] == [0.0]
    assert back.get("base") is not None  # untagged entries survive a rollback
    with pytest.raises(ValueError, match="roll back"):
        back.truncate(2)
    (tmp_path / "s" / "state.safetensors").write_bytes(b"junk")
    with pytest.raises(loka.ArtifactError):
        EditState.load(tmp_path / "s")


def test_spectrum_follows_the_accumulated_update(capsys, tmp_path):
    from loka.analysis import spectrum
    from loka.cli import main

    h = loka.load_model("tiny-llama")
    name = h.weight_name(2)
    w0 = h.param(name).detach().clone()
    g = torch.Generator().manual_seed(0)
    arts = []
    for k in range(3):
        d = {
            name: 5.0
            * torch.outer(torch.randn(w0.shape[0], generator=g), torch.randn(w0.shape[1], generator=g))
        }
        a = loka.Artifact.create(d, method="test", hparams={}, requests=[{"k": k}, {"k": k}], handle=h)
        arts.append(a)
        a.save(tmp_path / "seq" / f"batch_{k:05d}.loka")
    rows = spectrum(h, arts)
    assert [r["n_edits"] for r in rows] == [0, 2, 4, 6]
    total = w0.double() + sum(a.deltas[name].double() for a in arts)
    s = torch.linalg.svdvals(total)
    assert rows[-1]["sigma_max"] == pytest.approx(float(s[0]), rel=1e-6)
    assert rows[-1]["cond"] == pytest.approx(float(s[0] / s[-1]), rel=1e-6)
    assert rows[0]["delta_sigma_max"] == 0.0 and rows[-1]["sigma_max"] > rows[0]["sigma_max"]
    assert torch.equal(h.param(name), w0)  # analysis never touches the model
    code = main(
        [
            "analyze",
            "spectrum",
            "--model",
            "tiny-llama",
            "--sequence",
            str(tmp_path / "seq"),
            "--png",
            str(tmp_path / "s.png"),
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out) == 4 and (tmp_path / "s.png").stat().st_size > 1000


def test_lyaplock_first_batch_is_memit_and_the_queue_follows_eq7(hp):
    from loka.methods.lyaplock import lyaplock_solve
    from loka.methods.memit import memit_solve

    g = torch.Generator().manual_seed(2)
    K, R, W = torch.randn(3, 10, generator=g), torch.randn(3, 6, generator=g), torch.randn(6, 10, generator=g)
    A = torch.randn(20, 10, generator=g)
    C = A.T @ A / 20
    assert torch.allclose(
        lyaplock_solve(K, R, W, W, 50.0 * C, None, None, 1.0, 1.0), memit_solve(K, R, C, 50.0), atol=1e-5
    )

    h = loka.load_model("tiny-llama")
    state = EditState()
    lay = {**hp, "layers": [2], "alpha": 2.0}
    a = loka.edit(h, REQ_A, "memit", {**hp, "layers": [2]}, apply=False, progress=False)
    b = loka.edit(h, REQ_A, "lyaplock", lay, state=state, progress=False)
    w = h.weight_name(2)
    assert torch.allclose(a.deltas[w], b.deltas[w], atol=1e-5)  # aZ = 1, nothing past: MEMIT
    q = state.meta["lyaplock"][w]
    assert q["D"] == pytest.approx(2.0 * q["PL"]) and q["Z"] == pytest.approx(math.sqrt(q["D"]))
    z1, d, a_ = q["Z"], q["D"], q["a"]
    loka.edit(h, REQ_B, "lyaplock", lay, state=state, progress=False)
    q = state.meta["lyaplock"][w]
    assert q["Z"] == pytest.approx(max(z1 + a_ * (q["PL"] - d), z1))  # Eq. 7 with b = 0, Z_max = √D
    assert len(state.batch_tensors(f"lyaplock.keys.{w}")) == 2 and state.batches == 2


def _toy(seed=3, n=4, d=12, m=6):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(40, d, generator=g) * torch.linspace(0.05, 2.0, d)
    C = A.T @ A / 40
    return torch.randn(n, d, generator=g), torch.randn(n, m, generator=g), C


def test_relax_projection_gives_back_directions_only_while_they_pay():
    from loka.methods.alphaedit import AlphaEditHParams, relax

    K, R, C = _toy()
    hp = AlphaEditHParams(
        nullspace_threshold=float(torch.linalg.eigvalsh(C.double())[3]),
        L2=0.1,
        relax_step=2,
        relax_epsilon=0.01,
    )
    P, rank = nullspace_projection(C, hp.nullspace_threshold)

    def fit(Pm):
        return float((K.double() @ alphaedit_solve(K, R, Pm, None, 0.1).double().T - R.double()).pow(2).sum())

    P2, added = relax(K, R, C, P, None, hp)
    assert 0 < added <= 12 - rank and fit(P2) < fit(P)  # whole steps of 2, the last one may be short
    assert torch.allclose(P2 @ P2, P2, atol=1e-5)  # still a projection, of rank + added
    assert round(float(torch.trace(P2))) == rank + added
    hp.relax_epsilon = 1.0  # nothing can lower the loss by 100 %: P stays
    P3, none = relax(K, R, C, P, None, hp)
    assert none == 0 and torch.allclose(P3, P)


def test_smoothed_values_reach_the_targets_at_least_as_well_as_one_solve():
    from loka.methods.alphaedit import AlphaEditHParams, smoothed_solve

    K, R, C = _toy()
    P = torch.eye(12)
    hp = AlphaEditHParams(L2=1.0, smooth_T=4)
    one = alphaedit_solve(K, R, P, None, 1.0)
    smooth = smoothed_solve(K, R, P, None, hp)
    err = lambda dW: float((K @ dW.T - R).norm())  # noqa: E731
    assert err(smooth) < err(one)  # the iterations add up corrections
    # a single fact is never 'large' (the median is its own norm): one iteration per t on the full residual
    hp1 = AlphaEditHParams(L2=1e-6, smooth_T=2)
    assert torch.allclose(
        smoothed_solve(K[:1], R[:1], P, None, hp1), alphaedit_solve(K[:1], R[:1], P, None, 1e-6), atol=1e-4
    )


def test_conflict_weights_by_hand():
    from loka.methods.alphaedit import conflict_weights

    K = torch.tensor([[1.0, 0.0]])
    Kp = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    lam = conflict_weights(K, Kp, torch.tensor([False, False, False, True]))
    assert lam.tolist() == pytest.approx([1.0, 0.5, 1 / (1 + 2**-0.5), 0.0])


def test_conflict_weighting_supersedes_an_earlier_edit_of_the_same_fact(hp):
    h = loka.load_model("tiny-llama")
    opts = {**hp, "layers": [2], "nullspace_threshold": 1e9, "L2": 1.0}
    state = EditState()
    first = loka.edit(h, REQ_A, "alphaedit", opts, state=state, progress=False)
    again = loka.EditRequest(REQ_A.prompt, REQ_A.subject, "Berlin")  # same subject and relation, new object
    sup = loka.edit(
        h,
        again,
        "alphaedit",
        {**opts, "conflict_weighting": True},
        state=state.copy(),
        apply=False,
        progress=False,
    )
    fresh = loka.edit(
        h, again, "alphaedit", opts, apply=False, progress=False
    )  # as if the first edit had no past
    plain = loka.edit(h, again, "alphaedit", opts, state=state.copy(), apply=False, progress=False)
    w = h.weight_name(2)
    assert sup.manifest["extra"]["superseded"] == {"2": 1}
    assert torch.allclose(sup.deltas[w], fresh.deltas[w], atol=1e-5)  # the superseded key no longer fights
    assert not torch.allclose(plain.deltas[w], fresh.deltas[w], atol=1e-3)
    first.revert(h)
