"""LoRA (peft): the adapter edits, its merged form equals peft's own forward on every family
(GPT-2's Conv1D included), the run leaves the model untouched, and apply / revert / save / stack work."""

from __future__ import annotations

import pytest
import torch

import loka
from loka.artifact import stack_artifacts

from .conftest import TINY
from .conftest import answer_em as _em
from .conftest import prompt_logits as _logits

HP = {"layers": [1], "lr": 0.05, "max_steps": 80, "rank": 4}
A = loka.EditRequest("{} was born in the city of", "Zorblax Quint", "Q")


@pytest.mark.parametrize("name", TINY)
def test_lora_merged_adapter_equals_peft_forward(name, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    h = loka.load_model(name)
    w0 = {k: v.clone() for k, v in h.model.state_dict().items()}
    art = loka.edit(h, [A], "lora", HP, apply=False, progress=False)
    assert art.kind == "adapter"
    for k, v in h.model.state_dict().items():  # the run took its LoRA layers out again
        assert torch.equal(v, w0[k]), k
    target = h.weight_name(1)
    a, b = art.deltas[f"{target}.lora_A"], art.deltas[f"{target}.lora_B"]
    assert a.shape[0] == 4 and b.shape[1] == 4 and float(b.norm()) > 0

    art.apply(h)
    merged = _logits(h, A.text)
    assert art.manifest["extra"]["edit_em"] == 1.0 and _em(h, A.text, "Q") == 1.0
    art.revert(h)
    for k, v in h.model.state_dict().items():
        assert torch.equal(v, w0[k]), k

    path = target.removesuffix(".weight")  # the same factors in peft's own layer
    cfg = LoraConfig(
        r=4, lora_alpha=16.0, target_modules=[path], lora_dropout=0.0, fan_in_fan_out=h.spec.transposed
    )
    m = inject_adapter_in_model(cfg, h.model)
    mod = m.get_submodule(path)
    with torch.no_grad():
        mod.lora_A["default"].weight.copy_(a)
        mod.lora_B["default"].weight.copy_(b)
    torch.testing.assert_close(_logits(h, A.text), merged, atol=1e-4, rtol=1e-4)


def test_lora_save_load_stack_and_forget(tmp_path):
    h = loka.load_model("tiny-llama")
    base = _logits(h, A.text)
    art = loka.edit(h, [A], "lora", HP, apply=False, progress=False)
    art.save(tmp_path / "a.loka")
    loaded = loka.load_artifact(tmp_path / "a.loka")
    assert loaded.kind == "adapter" and set(loaded.deltas) == set(art.deltas)
    loaded.apply(h)
    edited = _logits(h, A.text)
    loaded.revert(h)
    assert torch.equal(_logits(h, A.text), base)
    stacked = stack_artifacts([loaded])  # adapters stack as their merged deltas
    assert stacked.kind == "weight-delta"
    stacked.apply(h)
    torch.testing.assert_close(_logits(h, A.text), edited)
    stacked.revert(h)

    # unlearning with the same adapter: NPO on a fact the edit taught
    loaded.apply(h)
    f = loka.ForgetRequest(A.prompt, A.subject, target_true="Q")
    forget = loka.unlearn(h, [f], method="lora", hparams={**HP, "max_steps": 60}, apply=False, progress=False)
    assert forget.manifest["extra"]["forget_loss"] == "npo"
    forget.apply(h)
    assert _em(h, A.text, "Q") == 0.0
    forget.revert(h)
    assert _em(h, A.text, "Q") == 1.0


def test_lora_bad_hyperparameters():
    h = loka.load_model("tiny-llama")
    with pytest.raises(loka.LokaError, match="forget_loss"):
        loka.edit(h, [A], "lora", {**HP, "forget_loss": "sgd"}, progress=False)
    with pytest.raises(loka.LokaError, match="rank"):
        loka.edit(h, [A], "lora", {**HP, "rank": 0}, progress=False)
