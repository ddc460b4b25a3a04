"""State carried from one edit batch to the next in sequential editing.

Some methods need what earlier batches did: AlphaEdit the second moment of all keys edited so far
(``K_p K_pᵀ`` per layer), PRUNE the accumulated update of each matrix and the original matrix's
largest singular value. An :class:`EditState` holds those tensors by name plus JSON-able counters,
is passed to :func:`loka.edit` (``state=``) and is saved atomically (safetensors + JSON, sha-checked
on load) so that a sequential run can stop and resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ArtifactError
from .utils.io import atomic_dir, hash_tensors


@dataclass
class EditState:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def set(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] = value.detach().clone().contiguous()

    def copy(self) -> EditState:
        return EditState({k: v.clone() for k, v in self.tensors.items()}, json.loads(json.dumps(self.meta)))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            save_file(self.tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"meta": self.meta, "sha": hash_tensors(self.tensors)}, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EditState:
        folder = Path(folder)
        try:
            info = json.loads((folder / "state.json").read_text())
            tensors = load_file(str(folder / "state.safetensors"))
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{folder}: not a readable edit state ({e})") from e
        if hash_tensors(tensors) != info.get("sha"):
            raise ArtifactError(f"{folder}: edit state does not match its recorded hash (corrupt); delete it")
        return cls(tensors, info.get("meta", {}))
