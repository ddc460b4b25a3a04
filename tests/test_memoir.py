"""MEMOIR: the masked residual memory edits its prompt, retrieves only on overlapping prompts (the
base model's logits exactly elsewhere), keeps the prompt's mask while generating with a cache, carries
W_m through sequential batches (applied artifacts act as one memory, rollback is exact), and saves,
loads, applies and reverts like every memory artifact."""

from __future__ import annotations

import pytest
import torch

import loka
from loka.cli import main
from loka.hf_compat import generate as hf_generate
from loka.methods.memoir import (
    mask_columns,
    mask_width,
    memory_matrix,
    permutation,
    prompt_features,
    runtime_of,
)
from loka.runtime import routers
from loka.scoring import target_logprobs
from loka.state import EditState

from .conftest import TINY
from .conftest import prompt_logits as _logits

HP = {"layer": 1, "n_iter": 30, "n_prefixes": 2, "tau": 0.9}
A = loka.EditRequest("{} was born in the city of", "Zorblax Quint", "Qx")
B = loka.EditRequest("{} works as a", "Perla Vint", "Zw")
U = "A completely different sentence about cooking pasta."


def _weights(h) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in h.model.state_dict().items()}


def _same_weights(h, w0) -> bool:
    return all(torch.equal(v, w0[k]) for k, v in h.model.state_dict().items())


def _logprob(h, req) -> float:
    return target_logprobs(h, [req.text], [req.target_new])[0]["logprob"]


def _route(h, text: str) -> int:
    return next(iter(runtime_of(h.model).route(h, [text])[0].values()))


def _no_hooks(h) -> bool:
    m = h.model
    return (
        runtime_of(m) is None
        and not routers(m)
        and not m._forward_pre_hooks
        and not any(mod._forward_hooks for mod in m.modules() if mod is not m.get_submodule(h.spec.unembed))
    )


@pytest.mark.parametrize("name", TINY)
def test_edit_raises_the_target_and_retrieves_on_its_prompt(name):
    h = loka.load_model(name)
    lp0 = _logprob(h, A)
    base = _logits(h, A.text)
    art = loka.edit(h, [A], "memoir", HP, progress=False)
    x = art.manifest["extra"]
    assert art.kind == "memory" and x["module"] == h.spec.mlp_out_path(1)
    assert x["top_k"] == mask_width(0.28, h.weight(1).shape[1]) and x["masks"] == 1
    assert _route(h, A.text) == 0  # the prompt retrieves its own stored mask
    assert _logprob(h, A) > lp0 + 1.0
    assert not torch.equal(_logits(h, A.text), base)  # a plain forward of the prompt uses the memory
    art.revert(h)


@pytest.mark.parametrize("name", TINY)
def test_an_unrelated_prompt_retrieves_nothing_and_keeps_the_base_logits(name):
    h = loka.load_model(name)
    base, lp0 = _logits(h, U), target_logprobs(h, [U], ["Qx"])[0]
    art = loka.edit(h, [A], "memoir", HP, progress=False)
    assert _route(h, U) == -1
    assert torch.equal(_logits(h, U), base)
    assert target_logprobs(h, [U], ["Qx"])[0] == lp0  # teacher-forced scoring, routed on the prompt
    art.revert(h)


@pytest.mark.parametrize("name", TINY)
def test_apply_and_revert_are_exact(name):
    h = loka.load_model(name)
    w0 = _weights(h)
    before = {t: _logits(h, t) for t in (A.text, U)}
    art = loka.edit(h, [A], "memoir", HP, progress=False)
    assert _same_weights(h, w0)  # the weights never change
    edited = _logits(h, A.text)
    art.revert(h)
    assert _same_weights(h, w0) and _no_hooks(h)
    assert all(torch.equal(_logits(h, t), v) for t, v in before.items())
    art.apply(h)
    assert torch.equal(_logits(h, A.text), edited)
    art.revert(h)
    assert _no_hooks(h) and torch.equal(_logits(h, A.text), before[A.text])


@pytest.mark.parametrize("name", TINY)
def test_sequential_batches_are_one_memory(name):
    h = loka.load_model(name)
    state = EditState()
    art1 = loka.edit(h, [A], "memoir", HP, progress=False, state=state)
    w1 = memory_matrix(state, 1)
    first = {t: _logits(h, t) for t in (A.text, B.text)}
    lp_b0 = _logprob(h, B)
    art2 = loka.edit(h, [B], "memoir", HP, progress=False, state=state)  # trained with art1 applied
    assert state.batches == 2 and art2.manifest["extra"]["batch"] == 1
    w2 = memory_matrix(state, 1)
    cols = art2.deltas["memoir.cols"].long()
    assert torch.equal(art2.deltas["memoir.delta"], w2[:, cols] - w1[:, cols])  # on top of the state's W_m
    mem = runtime_of(h.model).memories[h.spec.mlp_out_path(1)]
    assert torch.equal(mem.W, w2) and mem.masks.shape[0] == 2  # applied artifacts = the state's memory
    assert _route(h, A.text) == 0 and _route(h, B.text) == 1
    assert _logprob(h, B) > lp_b0 + 1.0  # the second edit works with the first applied
    both = {t: _logits(h, t) for t in (A.text, B.text)}
    art2.revert(h)
    assert all(torch.equal(_logits(h, t), v) for t, v in first.items())
    art1.revert(h)
    art2.apply(h)  # applied in the other order: the same one memory
    art1.apply(h)
    assert all(torch.equal(_logits(h, t), v) for t, v in both.items())
    art1.revert(h)
    art2.revert(h)
    assert _no_hooks(h)


def test_a_batch_trains_on_top_of_the_states_memory(tmp_path):
    h = loka.load_model("tiny-llama")
    state = EditState()
    art1 = loka.edit(h, [A], "memoir", HP, progress=False, state=state)
    w1 = memory_matrix(state, 1)
    again = loka.EditRequest(A.prompt, A.subject, "Zw")  # the same prompt: the same mask, not stored twice
    art2 = loka.edit(h, [again], "memoir", {**HP, "lr": 1e-9, "n_iter": 1}, progress=False, state=state)
    x = art2.manifest["extra"]
    assert x["duplicate_mask"] == [True] and x["prior_overlap"] == [1.0]
    assert (
        art2.deltas["memoir.masks"].shape[0] == 0
        and runtime_of(h.model).memories[x["module"]].masks.shape[0] == 1
    )
    assert float(art2.deltas["memoir.delta"].abs().max()) < 1e-6  # started from W_m, not from zero
    assert torch.allclose(memory_matrix(state, 1), w1, atol=1e-6)
    state.save(tmp_path / "state")
    art2.save(tmp_path / "b.loka")
    assert EditState.load(tmp_path / "state").content_hash() == state.content_hash()
    assert loka.load_artifact(tmp_path / "b.loka").id == art2.id
    art2.revert(h)
    art1.revert(h)


@pytest.mark.parametrize("name", TINY)
def test_rollback_restores_the_state_before_the_second_batch(name):
    h = loka.load_model(name)
    state = EditState()
    art1 = loka.edit(h, [A], "memoir", HP, progress=False, state=state)
    snap = state.copy()
    art2 = loka.edit(h, [B], "memoir", HP, progress=False, state=state)
    assert set(state.tensors) > set(snap.tensors)
    art2.revert(h)
    state.truncate(1)
    assert state.meta == snap.meta and set(state.tensors) == set(snap.tensors)
    assert all(torch.equal(state.tensors[k], v) for k, v in snap.tensors.items())
    assert state.content_hash() == snap.content_hash()
    again = loka.edit(h, [B], "memoir", HP, progress=False, state=state)  # the same batch again: same update
    assert again.id == art2.id
    again.revert(h)
    art1.revert(h)


@pytest.mark.parametrize("name", TINY)
def test_cached_greedy_generation_keeps_the_prompts_mask(name):
    h = loka.load_model(name)
    art = loka.edit(h, [A], "memoir", HP, progress=False)
    enc = h.tokenizer(A.text, return_tensors="pt")
    n = len(h.tokenizer(" Qx", add_special_tokens=False)["input_ids"])
    widths = []
    probe = h.mlp_out(1).register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[1]))
    try:
        seqs = hf_generate(
            h.model,
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=n,
            pad_token_id=h.tokenizer.pad_token_id,
        )
    finally:
        probe.remove()
    assert widths[1:] == [1] * (n - 1)  # decode steps saw one token each: the cache was used
    assert h.tokenizer.decode(seqs[0, enc["input_ids"].shape[1] :]) == " Qx"
    art.revert(h)


@pytest.mark.parametrize("name", TINY)
def test_artifact_saves_loads_and_has_a_stable_id(name, tmp_path):
    h = loka.load_model(name)
    art = loka.edit(h, [A], "memoir", HP, progress=False, apply=False)
    again = loka.edit(h, [A], "memoir", HP, progress=False, apply=False)
    assert again.id == art.id  # the same edit from the same model is the same artifact
    art.apply(h)
    edited = _logits(h, A.text)
    art.save(tmp_path / "m.loka")
    art.revert(h)
    loaded = loka.load_artifact(tmp_path / "m.loka")
    assert loaded.id == art.id and all(torch.equal(loaded.deltas[k], v) for k, v in art.deltas.items())
    loaded.apply(h)
    assert torch.equal(_logits(h, A.text), edited)
    loaded.revert(h)
    assert _no_hooks(h)


def test_tophash_masks_and_their_width():
    x = torch.tensor([[[1.0, -5.0, 0.0, 2.0], [3.0, -5.0, 0.0, 0.0]]])  # mean: 2, -5, 0, 1
    f = prompt_features(x, None, "mean")
    assert torch.equal(f, torch.tensor([[2.0, -5.0, 0.0, 1.0]]))
    assert torch.equal(prompt_features(x, torch.tensor([[1, 0]]), "mean"), x[:, 0])
    assert torch.equal(prompt_features(x, torch.tensor([[1, 1]]), "last"), x[:, 1])
    perm = torch.tensor([3, 2, 1, 0])
    assert mask_columns(f, torch.zeros(4), perm, 2, "mean").tolist() == [[2, 3]]  # π({1, 0})
    bg = torch.tensor([2.0, 0.0, 0.0, 0.0])  # decentred: 0, -5, 0, 1
    assert mask_columns(f, bg, perm, 2, "mean_decentered").tolist() == [[0, 2]]  # π({1, 3})
    assert mask_width(0.25, 128) == 32 and mask_width(5, 128) == 5
    for bad in (2.5, 200):
        with pytest.raises(loka.LokaError, match="top_k"):
            mask_width(bad, 128)
    assert torch.equal(permutation(16, 3), permutation(16, 3)) and not torch.equal(
        permutation(16, 3), permutation(16, 4)
    )


def test_a_diverging_write_is_refused_naming_the_step():
    h = loka.load_model("tiny-llama")
    w0 = _weights(h)
    with pytest.raises(loka.DivergenceError, match="step"):
        loka.edit(h, [A], "memoir", {**HP, "lr": 1e30, "max_grad_norm": 1e30}, progress=False)
    assert _same_weights(h, w0) and _no_hooks(h)


def test_parts_made_with_other_settings_do_not_stack():
    h = loka.load_model("tiny-llama")
    a = loka.edit(h, [A], "memoir", HP, progress=False)
    b = loka.edit(h, [B], "memoir", {**HP, "seed": 1}, progress=False, apply=False)
    with pytest.raises(loka.ArtifactError, match="other settings"):
        b.apply(h)
    a.revert(h)
    assert _no_hooks(h)
    state = EditState()
    loka.edit(h, [A], "memoir", HP, progress=False, state=state, apply=False)
    with pytest.raises(loka.ConfigError, match="top_k"):
        loka.edit(h, [B], "memoir", {**HP, "top_k": 0.5}, progress=False, state=state, apply=False)


def test_cli_edit_with_memoir(capsys, tmp_path):
    code = main(
        [
            "edit",
            "--model",
            "tiny-llama",
            "--method",
            "memoir",
            "--prompt",
            A.prompt,
            "--subject",
            A.subject,
            "--target",
            A.target_new,
            "--set",
            "n_prefixes=2",
            "--save",
            str(tmp_path / "m.loka"),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    art = loka.load_artifact(tmp_path / "m.loka")
    assert art.method == "memoir" and art.kind == "memory"
