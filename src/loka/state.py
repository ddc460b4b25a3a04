"""State carried from one edit batch to the next in sequential editing.

Some methods need what earlier batches did: AlphaEdit the keys of all facts edited so far (per
layer), PRUNE the original matrices (the accumulated update is the live weight minus them) and
their largest singular values. An :class:`EditState` holds such tensors by name plus JSON-able
counters, is passed to :func:`loka.edit` (``state=``), which counts the batches, and is saved
atomically (safetensors + JSON, sha-checked on load) so that a sequential run can stop and resume.

Per-batch tensors are tagged with their batch index (``name@k``), so rolling back to ``n`` batches
is dropping the tags ``>= n`` (:meth:`EditState.truncate`) — no state snapshot per batch is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load

from .errors import ArtifactError, ConfigError
from .utils.io import atomic_dir, hash_json, hash_tensors, read_json, read_regular, save_safetensors


@dataclass
class EditState:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def set(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] = value.detach().clone().contiguous()

    @property
    def batches(self) -> int:
        """Number of edit batches this state has seen."""
        return int(self.meta.get("batches", 0))

    def add_batch_tensor(self, name: str, value: torch.Tensor) -> None:
        """Record ``value`` under ``name`` for the current batch (the one being edited)."""
        self.set(f"{name}@{self.batches}", value)

    def batch_tensors(self, name: str) -> list[torch.Tensor]:
        """The tensors recorded under ``name``, in batch order."""
        tagged = [
            (int(k.rsplit("@", 1)[1]), v)
            for k, v in self.tensors.items()
            if k.rsplit("@", 1)[0] == name and "@" in k
        ]
        return [v for _, v in sorted(tagged, key=lambda x: x[0])]

    def truncate(self, n_batches: int) -> None:
        """Forget everything recorded by batches ``>= n_batches`` (a rollback)."""
        if not 0 <= n_batches <= self.batches:
            raise ConfigError(
                f"cannot roll back to {n_batches} batch(es) (--rollback): the state has {self.batches}"
            )
        self.tensors = {
            k: v for k, v in self.tensors.items() if "@" not in k or int(k.rsplit("@", 1)[1]) < n_batches
        }
        self.meta["batches"] = n_batches

    def copy(self) -> EditState:
        return EditState({k: v.clone() for k, v in self.tensors.items()}, json.loads(json.dumps(self.meta)))

    def content_hash(self) -> str:
        """A hash of the tensors and the counters: what a batch index records for the state it built."""
        return hash_json([hash_tensors(self.tensors), self.meta])

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            save_safetensors(self.tensors, tmp / "state.safetensors")
            info = {"meta": self.meta, "sha": hash_tensors(self.tensors), "content": self.content_hash()}
            (tmp / "state.json").write_text(json.dumps(info, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EditState:
        folder = Path(folder)
        try:
            info = read_json(folder / "state.json", 16 * 1024 * 1024)
            tensors = safetensors_load(read_regular(folder / "state.safetensors", 1 << 34))
        except Exception as e:  # missing, unreadable, or not safetensors/JSON at all
            raise ArtifactError(f"{folder}: not a readable edit state ({e})") from None
        if not isinstance(info, dict) or not isinstance(info.get("meta", {}), dict):
            raise ArtifactError(f"{folder}/state.json is malformed; it was edited by hand")
        if hash_tensors(tensors) != info.get("sha"):
            raise ArtifactError(f"{folder}: edit state does not match its recorded hash (corrupt); delete it")
        state = cls(tensors, info.get("meta", {}))
        if "content" in info and state.content_hash() != info["content"]:
            raise ArtifactError(
                f"{folder}/state.json: its counters do not match its recorded hash; it was edited by hand"
            )
        return state
