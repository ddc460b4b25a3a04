"""WISE: the side memory edits its prompts, routes by the activation gap (an untrained memory or a
gap below τ changes nothing), and applies / reverts / saves like every memory artifact."""

from __future__ import annotations

import pytest
import torch

import loka
from loka.methods.wise import SideMemory

from .conftest import TINY
from .conftest import answer_em as _em
from .conftest import prompt_logits as _logits

HP = {"layer": 1, "lr": 0.05, "n_iter": 70}
A = loka.EditRequest("{} was born in the city of", "Zorblax Quint", "Q")
B = loka.EditRequest("{} works as a", "Perla Vint", "Z")


@pytest.mark.parametrize("name", TINY)
def test_wise_edits_and_reverts_exactly(name, tmp_path):
    h = loka.load_model(name)
    w0 = {k: v.clone() for k, v in h.model.state_dict().items()}
    before = _logits(h, A.text)
    art = loka.edit(h, [A, B], "wise", HP, progress=False)
    x = art.manifest["extra"]
    assert art.kind == "memory" and x["module"] == h.spec.mlp_out_path(1)
    assert _em(h, A.text, "Q") == 1.0 and _em(h, B.text, "Z") == 1.0
    assert x["tau"] == pytest.approx(0.88 * x["gap_in_min"])
    mask = art.deltas["wise.delta"] != 0  # only the shard (mask_ratio of the entries) was written
    assert 0 < float(mask.float().mean()) <= 0.25
    for k, v in h.model.state_dict().items():
        assert torch.equal(v, w0[k]), k
    edited = _logits(h, A.text)
    art.save(tmp_path / "w.loka")
    art.revert(h)
    assert torch.equal(_logits(h, A.text), before)
    loaded = loka.load_artifact(tmp_path / "w.loka").apply(h)
    assert torch.equal(_logits(h, A.text), edited)
    loaded.revert(h)
    assert torch.equal(_logits(h, A.text), before)


def test_side_memory_routing():
    out = torch.zeros(1, 3, 2)
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    d = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # gaps: 2, 0.5, 0
    y = SideMemory(d, tau=1.0)(None, (a,), out)
    assert torch.equal(y[0, 0], torch.tensor([2.0, 0.0]))  # above τ: side memory answers
    assert torch.equal(y[0, 1], torch.zeros(2)) and torch.equal(y[0, 2], torch.zeros(2))  # below: main
    h = loka.load_model("tiny-llama")  # an untrained side memory leaves the logits unchanged
    base = _logits(h, A.text)
    hook = h.mlp_out(1).register_forward_hook(SideMemory(torch.zeros_like(h.weight(1)), tau=1e-6))
    try:
        assert torch.equal(_logits(h, A.text), base)
    finally:
        hook.remove()


def test_wise_bad_hyperparameters():
    h = loka.load_model("tiny-llama")
    for bad, field in [
        ({"mask_ratio": 0}, "mask_ratio"),
        ({"n_iter": 0}, "n_iter"),
        ({"norm_constraint": 0}, "norm_constraint"),
    ]:
        with pytest.raises(loka.LokaError, match=field):
            loka.edit(h, [A], "wise", {**HP, **bad}, progress=False)
