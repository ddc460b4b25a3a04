"""GRACE: the codebook edits the prompt it was trained on, leaves other inputs bit-identical, and
applies / reverts / saves like every artifact (tiny models of every family)."""

from __future__ import annotations

import pytest
import torch

import loka

from .conftest import TINY
from .conftest import answer_em as _em
from .conftest import prompt_logits as _logits

HP = {"layer": 1, "eps": 0.2, "lr": 0.5, "n_iter": 60}
A = loka.EditRequest("{} was born in the city of", "Zorblax Quint", "Q")
B = loka.EditRequest("{} works as a", "Perla Vint", "Z")


@pytest.mark.parametrize("name", TINY)
def test_grace_edits_its_prompt_only_and_reverts_exactly(name, tmp_path):
    h = loka.load_model(name)
    other = "Mira Olde likes to eat"
    before_a, before_other = _logits(h, A.text), _logits(h, other)
    w_before = {k: v.clone() for k, v in h.model.state_dict().items()}
    art = loka.edit(
        h, [A, B], "grace", {**HP, "eps": 0.05}, progress=False
    )  # random tiny models: keys sit close
    assert art.kind == "memory" and art.manifest["extra"]["entries"] == 4  # 2 answer positions each
    assert _em(h, A.text, "Q") == 1.0 and _em(h, B.text, "Z") == 1.0
    assert torch.equal(_logits(h, other), before_other)  # outside every ball: untouched, bit for bit
    for k, v in h.model.state_dict().items():  # a codebook changes no weight
        assert torch.equal(v, w_before[k]), k
    edited = _logits(h, A.text)
    art.save(tmp_path / "g.loka")
    art.revert(h)
    assert torch.equal(_logits(h, A.text), before_a)
    loaded = loka.load_artifact(tmp_path / "g.loka").apply(h)
    assert torch.equal(_logits(h, A.text), edited)
    loaded.revert(h)
    assert torch.equal(_logits(h, A.text), before_a)


def test_grace_codebook_rules():
    """Same prompt, new answer: overwritten; nearby keys with other answers: radii split so that no
    two balls of different labels overlap; nearby keys with the same answer: the ball grows."""
    h = loka.load_model("tiny-llama")
    again = loka.EditRequest(A.prompt, A.subject, "R")
    art = loka.edit(h, [A, again], "grace", HP, apply=False, progress=False)
    ex = art.manifest["extra"]
    assert (
        ex["entries"] == 2
        and ex["overwritten"] == 2
        and [x.split("\x1f")[0] for x in ex["labels"]] == ["R", "R"]
    )
    art.apply(h)
    assert _em(h, A.text, "R") == 1.0 and _em(h, A.text, "Q") == 0.0
    art.revert(h)
    big = {**HP, "eps": 10.0}  # radii large enough that the balls of the two prompts overlap
    near = loka.EditRequest("{} was born in the town of", "Zorblax Quint", "W")
    art = loka.edit(h, [A, near], "grace", big, apply=False, progress=False)
    keys, eps, labels = art.deltas["grace.keys"], art.deltas["grace.eps"], art.manifest["extra"]["labels"]
    assert art.manifest["extra"]["split"] >= 1
    d = torch.cdist(keys, keys)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            if labels[i] != labels[j]:
                assert float(eps[i] + eps[j]) <= float(d[i, j]) * (1 + 1e-5), (i, j)
    same = loka.EditRequest("{} was born in the town of", "Zorblax Quint", "Q")
    art = loka.edit(h, [A, same], "grace", big, apply=False, progress=False)
    ex = art.manifest["extra"]
    assert ex["covered"] >= 1 and ex["entries"] == 4 - ex["covered"]  # a covered key adds no entry


def test_grace_artifact_is_refused_on_a_model_without_its_module():
    h = loka.load_model("tiny-llama")
    art = loka.edit(h, A, "grace", HP, apply=False, progress=False)
    art.manifest["extra"]["module"] = "model.layers.99.mlp.down_proj"
    with pytest.raises(loka.ArtifactError, match="does not have"):
        art.apply(h)


@pytest.mark.parametrize(
    "bad,field", [({"eps": 0.0}, "eps"), ({"n_iter": 0}, "n_iter"), ({"layer": 9}, "layer")]
)
def test_grace_refuses_bad_hyperparameters(bad, field):
    h = loka.load_model("tiny-llama")
    with pytest.raises((loka.LokaError, loka.ModelError), match=field):
        loka.edit(h, A, "grace", {**HP, **bad}, progress=False)


def _assert_same_values(got, want):
    """Equal up to rounding: a padded batch's forward differs from a single row's by ~1e-6, and Adam's
    normalised step can turn that into an lr-sized step on an element whose gradient is ~0; so at most
    a few elements may differ, and nearly all agree to 1e-4 (a stopped request that kept training would
    move all of its elements)."""
    off = (got - want).abs() > 1e-4
    assert float(off.float().mean()) < 0.01, f"{int(off.sum())} of {off.numel()} elements differ"


def _values_one_by_one(h, reqs, hp):
    """GRACE's protocol as written: each request alone, a full forward per step (the reference the
    batched training must follow)."""
    from loka.forgetting import losses as L
    from loka.methods.grace import _io_at_answer_positions
    from loka.trace import add_at_positions

    module = h.mlp_out(hp["layer"])
    out = []
    for req in reqs:
        batch = L.qa_batch(h.tokenizer, [req.text], [req.target_new])
        _, V0, pos = _io_at_answer_positions(h, hp["layer"], batch)
        delta = torch.zeros_like(V0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp["lr"])
        step, nll = 0, float("nan")
        while step < hp["n_iter"]:
            step += 1
            with add_at_positions(module, delta, pos):
                lg, rows = L.answer_logits(h, batch)
            loss = L.nll_loss(*L.sequence_logprobs(lg, rows, batch))
            nll = float(loss.detach())
            if nll < hp["early_stop_loss"]:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append((V0 + delta.detach(), nll, step))
    return out


@pytest.mark.parametrize("name", TINY)
def test_values_trained_together_follow_each_requests_own_training(name):
    """The batched, replayed training equals training each request alone with full forwards: the same
    number of steps per request (some stop early, some run to ``n_iter``), the same values."""
    from loka.forgetting import losses as L
    from loka.methods.grace import GraceHParams, _io_at_answer_positions, _train_values

    h = loka.load_model(name)
    reqs = [
        A,
        B,
        loka.EditRequest("The capital of {} is", "Quorvia", "Blen Tor"),
        loka.EditRequest("{} speaks", "Ida", "Q"),
    ]
    # a threshold just above the lowest NLL after three steps: that request stops by step 4
    probe = _values_one_by_one(h, reqs, {"layer": 1, "lr": 0.5, "n_iter": 4, "early_stop_loss": 0.0})
    stop = min(n for _, n, _ in probe) + 1e-4
    hp = {"layer": 1, "eps": 0.2, "lr": 0.5, "n_iter": 10, "early_stop_loss": stop}
    ref = _values_one_by_one(h, reqs, hp)
    batch = L.qa_batch(h.tokenizer, [r.text for r in reqs], [r.target_new for r in reqs])
    _, V0, pos = _io_at_answer_positions(h, 1, batch)
    delta, nll, steps = _train_values(h, 1, h.mlp_out(1), batch, pos, V0, GraceHParams(**hp))
    assert steps == [s for _, _, s in ref]
    assert len(set(steps)) > 1  # the requests stop at different steps: the test covers leaving the batch
    for i, (v_ref, nll_ref, _) in enumerate(ref):
        at = (pos[:, 0] == i).nonzero()[:, 0]
        _assert_same_values(V0[at] + delta[at], v_ref)
        assert nll[i] == pytest.approx(nll_ref, rel=1e-4, abs=1e-5)


def test_values_trained_together_under_an_applied_memoir_memory():
    """A MEMOIR memory applied above GRACE's layer keeps per-forward state sized to the replayed batch:
    requests that stop must not leave that batch, or the memory reads the wrong rows."""
    from loka.forgetting import losses as L
    from loka.methods.grace import GraceHParams, _io_at_answer_positions, _train_values

    h = loka.load_model("tiny-llama")
    memory = loka.edit(
        h, [A, loka.EditRequest("{} speaks", "Ida", "Q")], "memoir", {"layer": 2}, progress=False
    )
    reqs = [
        loka.EditRequest("{} was born in the city of", "Zorblax Quint", "Berlin Zed"),
        loka.EditRequest("{} speaks", "Ida", "Frenchy"),
        loka.EditRequest("The capital of {} is", "Quorvia", "Blen Tor"),
        loka.EditRequest("{} plays the", "Rob Ert", "violin maker"),
    ]
    first = _values_one_by_one(h, reqs, {"layer": 1, "lr": 0.5, "n_iter": 1, "early_stop_loss": 0.0})
    hp = {
        "layer": 1,
        "eps": 0.2,
        "lr": 0.5,
        "n_iter": 4,
        "early_stop_loss": min(n for _, n, _ in first) + 1e-3,
    }
    ref = _values_one_by_one(h, reqs, hp)
    batch = L.qa_batch(h.tokenizer, [r.text for r in reqs], [r.target_new for r in reqs])
    _, V0, pos = _io_at_answer_positions(h, 1, batch)
    delta, nll, steps = _train_values(h, 1, h.mlp_out(1), batch, pos, V0, GraceHParams(**hp))
    memory.revert(h)
    assert steps == [s for _, _, s in ref] and 1 in steps and max(steps) > 1  # one request stops at once
    for i, (v_ref, nll_ref, _) in enumerate(ref):
        at = (pos[:, 0] == i).nonzero()[:, 0]
        _assert_same_values(V0[at] + delta[at], v_ref)
        assert nll[i] == pytest.approx(nll_ref, rel=1e-4, abs=1e-5)
