"""Hugging Face folders that answer as loka does with memory artifacts applied (GRACE, WISE, MEMOIR).

A Hugging Face folder holds weights; GRACE's codebook, WISE's side memory and MEMOIR's residual memory
act at inference through forward hooks. :meth:`loka.models.loader.ModelHandle.save_pretrained` (and so
``loka apply --out``) therefore writes, beside the weights:

* ``modeling_loka.py`` (from ``templates/``): the base architecture's transformers class (``BASE_MODEL``,
  e.g. ``LlamaForCausalLM``) with the same hooks in plain torch, installed in ``__init__`` in the order
  loka installed them. It imports only torch, transformers and the standard library;
* the hooks' tensors as buffers ``loka_memory.h<i>.<name>`` in ``model.safetensors`` (safetensors, no
  pickle), their settings in ``config.json`` (``loka_memory``);
* ``config.json`` with ``auto_map`` naming the file's classes and loka's own ``model_type``
  (``loka_<base>``), so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
  loads the behaviour and a load without ``trust_remote_code`` fails instead of answering as the base model.

Each memory method registers how its applied artifacts become hooks (:func:`loka.models.hooked.register_export`);
the others (LOKA's codebook, SCR's fact store) register why they cannot, and an export with one of them
applied is refused before anything is written. Weight formats (GGUF) keep refusing every hooked artifact
(:func:`loka.models.hooked.check_exportable`).

This module sits with the models layer (``ModelHandle.save_pretrained`` calls it) and imports only the
foundation and :mod:`loka.models.hooked`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ArtifactError
from ..models.hooked import ExportedHook, exported_hooks
from ..utils.io import atomic_write_json, read_json

TEMPLATE = Path(__file__).parent / "templates" / "modeling_loka.py"
MODELLING_FILE = "modeling_loka.py"
MODEL_CLASS = "LokaForCausalLM"
CONFIG_CLASS = "LokaConfig"
MEMORY_KEY = "loka_memory"  # the config key, and the submodule holding the buffers
FORMAT = 1  # the layout of config.loka_memory (the template's FORMAT)
LOAD = "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)"


@dataclass
class RemoteExport:
    """What an export writes for the hooked artifacts of one model: the hooks, the base classes."""

    hooks: list[ExportedHook]
    base_model: str  # the model's transformers class, e.g. LlamaForCausalLM
    base_config: str  # its configuration class, e.g. LlamaConfig
    model_type: str  # the folder's model type: loka_<base model type>

    def tensors(self) -> dict[str, torch.Tensor]:
        """The hooks' buffers under their state-dict names (``loka_memory.h<i>.<name>``)."""
        return {
            f"{MEMORY_KEY}.h{i}.{n}": t.detach().cpu().contiguous()
            for i, h in enumerate(self.hooks)
            for n, t in h.tensors.items()
        }

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict and the hooks' buffers: what ``model.safetensors`` holds. The model
        itself is not changed."""
        return {**model.state_dict(), **self.tensors()}

    def settings(self) -> dict:
        """``config.loka_memory``: per hook its kind, module, settings, artifacts and tensors' shapes."""
        return {
            "format": FORMAT,
            "hooks": [
                {
                    "kind": h.kind,
                    "module": h.module,
                    "settings": h.settings,
                    "artifacts": h.artifacts,
                    "tensors": {
                        n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for n, t in h.tensors.items()
                    },
                }
                for h in self.hooks
            ],
        }

    def modelling_source(self) -> str:
        """The template with this model's base classes and model type filled in."""
        text = TEMPLATE.read_text(encoding="utf-8")
        for name, value in (
            ("BASE_MODEL", self.base_model),
            ("BASE_CONFIG", self.base_config),
            ("MODEL_TYPE", self.model_type),
        ):
            text, n = re.subn(rf'^{name} = "[^"\n]*"$', f'{name} = "{value}"', text, flags=re.M)
            if n != 1:  # the packaged template was changed without this module
                raise ArtifactError(f"{TEMPLATE} has no single {name} line; reinstall loka")
        return text

    def write(self, folder: Path) -> dict:
        """Write the modelling file into ``folder`` (saved by ``save_pretrained`` with :meth:`state_dict`)
        and point its ``config.json`` at it; returns the record for ``loka-export.json``."""
        (folder / MODELLING_FILE).write_text(self.modelling_source(), encoding="utf-8")
        config = read_json(folder / "config.json", 64 << 20)
        config.update(
            model_type=self.model_type,
            architectures=[MODEL_CLASS],
            auto_map={
                "AutoConfig": f"{MODELLING_FILE[:-3]}.{CONFIG_CLASS}",
                "AutoModelForCausalLM": f"{MODELLING_FILE[:-3]}.{MODEL_CLASS}",
            },
        )
        config[MEMORY_KEY] = self.settings()
        atomic_write_json(folder / "config.json", config)
        return {
            "file": MODELLING_FILE,
            "class": MODEL_CLASS,
            "base": self.base_model,
            "load": LOAD,
            "hooks": [{"kind": h.kind, "module": h.module, "artifacts": h.artifacts} for h in self.hooks],
        }


def remote_export(model: nn.Module) -> RemoteExport | None:
    """How ``model``'s hooked artifacts go into an exported folder (``None``: it has none, the folder is
    weights alone). Refuses, before anything is written, an artifact no modelling file can carry and a
    model whose class is not one of transformers' own."""
    hooks = exported_hooks(model)
    if not hooks:
        return None
    import transformers

    base, config = type(model).__name__, type(model.config).__name__
    if getattr(transformers, base, None) is not type(model) or getattr(
        transformers, config, None
    ) is not type(model.config):
        raise ArtifactError(
            f"cannot export: the memories of {', '.join(i for h in hooks for i in h.artifacts)} need a "
            f"modelling file built on the model's class, and {base} ({config}) is not one of transformers' "
            "own; use them through loka (loka generate --artifact)"
        )
    return RemoteExport(hooks, base, config, f"loka_{model.config.model_type}")
