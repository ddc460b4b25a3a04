"""Edits as artifacts: weight deltas (safetensors) + a JSON manifest, applied and reverted exactly.

An artifact folder ``NAME.loka/`` holds ``deltas.safetensors`` and ``manifest.json`` (method,
hyperparameters, requests, model identity hash, library version, creation time, sha256 of the
tensors). Its ``id`` is derived from its content — the tensors and every manifest field that changes
what applying it does — so two artifacts with the same id are the same update.

Guarantees (each backed by a test in ``tests/test_faults.py``):

* saving is atomic: the folder is built under a unique temporary name and swapped in one step, so
  the path always holds the old artifact or the new one, complete; an existing folder is replaced
  only if it is a loka artifact and ``force`` is given, never a folder loka did not write;
* loading verifies everything before returning: both files are regular files (no links, FIFOs or
  devices) of bounded size, the manifest has every required field, the tensors match its sha256, its
  parameter list, shapes and dtypes, and the id matches the content;
* applying keeps a copy of the touched parameters, so a revert restores them bit for bit, in any
  order; an artifact, or any artifact it was stacked from, cannot be applied twice.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as safetensors_load
from torch import nn

from . import runtime
from .errors import ArtifactError, InputError, LokaError
from .runtime import applied_context  # noqa: F401  (part of this module's public surface)
from .utils.io import (
    atomic_dir,
    atomic_write_json,
    check_output_dir,
    hash_json,
    hash_tensors,
    read_json,
    read_regular,
    recover_dir,
    save_safetensors,
    sha256_bytes,
    sha256_file,
)
from .version import __version__
from .weights import preserved_weights  # noqa: F401  (part of this module's public surface)

if TYPE_CHECKING:
    from .models.loader import ModelHandle

log = logging.getLogger(__name__)

FORMAT = "loka-artifact"
FORMAT_VERSION = 3  # 2: the id hashes the tensors and every field in ID_FIELDS; 3: not the phase timings
_STACK_ATTR = "_loka_applied"  # list of (artifact, {param name: original tensor}) kept on the model
from .models.hooked import MEMORY_ATTR  # noqa: E402  (applied memory artifacts and their hook handles)

#: method name -> ``attach(model, artifact) -> handle`` (``handle.remove()`` detaches): how a ``memory``
#: artifact of that method installs its forward hooks. Methods fill it (``loka.methods.base.register``).
MEMORY_KINDS: dict[str, Callable[[nn.Module, Artifact], Any]] = {}


#: tensors that hold indices or labels, not values (saved as float32 like every artifact tensor), as
#: their methods declare them (``Method.index_tensors``). A norm of them means nothing, so
#: :meth:`Artifact.summary` (``loka inspect``) gives none.
INDEX_TENSORS: set[str] = set()


def register_index_tensors(names: Iterable[str]) -> None:
    """Say which artifact tensors of a method hold indices, not values."""
    INDEX_TENSORS.update(names)


def holds_values(name: str, t: torch.Tensor) -> bool:
    """Whether tensor ``name`` holds values whose norm says something (a float tensor, not indices)."""
    return t.is_floating_point() and name not in INDEX_TENSORS


def register_memory(method: str, attach: Callable[[nn.Module, Artifact], Any]) -> None:
    """Say how a ``memory`` artifact of ``method`` is installed (its hooks) on a model."""
    MEMORY_KINDS[method] = attach


def merged_adapter(a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """A LoRA adapter's weight update ``scaling · B A`` in the weight's stored orientation (``(in, out)``
    for Conv1D)."""
    d = scaling * (b.double() @ a.double())
    return (d.T if transposed else d).to(torch.float32).contiguous()


def _model_of(target) -> tuple[nn.Module, str | None]:
    if isinstance(target, nn.Module):
        return target, None
    return target.model, target.model_hash


#: manifest fields that change what applying the artifact does: the id is a hash of them and the tensors
ID_FIELDS = ("kind", "method", "hparams", "requests", "params", "extra", "parents")
#: fields of ``extra`` that say how long the method ran, not what the update is, by format version
VOLATILE_EXTRA = {1: ("seconds",), 2: ("seconds",), 3: ("seconds", "timings")}
#: fields a manifest must have to be loaded
REQUIRED_FIELDS = (
    "format",
    "format_version",
    "id",
    "kind",
    "method",
    "hparams",
    "requests",
    "model",
    "params",
    "tensors_sha256",
)
FILES = ("manifest.json", "deltas.safetensors")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: how long a reader keeps re-reading a folder that concurrent writers keep replacing
READ_RETRY_SECONDS = 30.0
_DTYPE_BYTES = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def content_id(manifest: dict, deltas: dict[str, torch.Tensor]) -> str:
    """The artifact's id: a hash over its tensors, the model it was made for and :data:`ID_FIELDS`."""
    fields = {k: manifest.get(k) for k in ID_FIELDS}
    volatile = VOLATILE_EXTRA.get(manifest.get("format_version"), VOLATILE_EXTRA[FORMAT_VERSION])
    if isinstance(fields["extra"], dict):  # how long the method ran is not part of what the update is
        fields["extra"] = {k: v for k, v in fields["extra"].items() if k not in volatile}
        parts = fields["extra"].get("parts")
        if manifest.get("format_version", FORMAT_VERSION) >= 3 and isinstance(parts, list):  # a bundle's
            fields["extra"]["parts"] = [  # parts, each without its own run times
                {k: v for k, v in p.items() if k != "extra"}
                | {"extra": {k: v for k, v in p["extra"].items() if k not in volatile}}
                if isinstance(p, dict) and isinstance(p.get("extra"), dict)
                else p
                for p in parts
            ]
    fields["model_hash"] = (manifest.get("model") or {}).get("hash")
    return hash_json([hash_tensors(deltas), fields])[:16]


def lineage(artifact: Artifact) -> set[str]:
    """Its id and the ids of every artifact it was stacked or bundled from."""
    ids = {artifact.id}
    for p in artifact.manifest.get("parents") or []:
        ids.add(p)
    for part in (artifact.manifest.get("extra") or {}).get("parts", []) if artifact.kind == "bundle" else []:
        ids.add(part.get("id"))
        ids.update(part.get("parents") or [])
    ids.discard(None)
    return ids


def applied_artifacts(model: nn.Module) -> list[Artifact]:
    """The artifacts applied to ``model``: weight deltas and adapters in the order applied, then memories,
    then context stores (the parts of a bundle each appear on their own)."""
    applied = [a for a, _ in model.__dict__.get(_STACK_ATTR, [])]
    applied += [a for a, _ in model.__dict__.get(MEMORY_ATTR, [])]
    applied += list(runtime.applied_context(model))
    return applied


def applied_lineage(model: nn.Module) -> dict[str, str]:
    """``{id: applied artifact id}`` over every artifact applied to ``model`` and what it was made from."""
    out: dict[str, str] = {}
    for a in applied_artifacts(model):
        for i in lineage(a):
            out[i] = a.id
    return out


def is_artifact_dir(path: Path) -> bool:
    """Whether ``path`` is a folder loka wrote as an artifact: only ``manifest.json`` and
    ``deltas.safetensors``, and a manifest of loka's format. Read through one handle of the folder,
    and again if a concurrent writer swapped it meanwhile."""
    deadline = time.monotonic() + READ_RETRY_SECONDS
    while time.monotonic() < deadline:
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            st = os.fstat(dfd)
            names = set(os.listdir(dfd))
            if names and names <= set(FILES):
                return read_json("manifest.json", MAX_MANIFEST_BYTES, dir_fd=dfd).get("format") == FORMAT
        except (OSError, LokaError, AttributeError):
            pass
        finally:
            os.close(dfd)
        if _still_at(path, st):
            return False
        time.sleep(0.001)  # swapped by a writer meanwhile: look again
    return False


def check_artifact_output(path: str | Path, force: bool = False) -> Path:
    """Before any work: may an artifact be saved at ``path``? (:func:`loka.utils.io.check_output_dir`)"""
    return check_output_dir(path, is_ours=is_artifact_dir, what="a loka artifact", force=force)


class _Replaced(Exception):
    """The folder was replaced while being read: read it again."""


def _still_at(path: Path, st: os.stat_result) -> bool:
    """Whether the folder opened as ``st`` is still the one at ``path``."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


@dataclass
class Artifact:
    """Weight deltas (in each parameter's stored orientation) and the manifest that explains them.

    ``steps`` says what the run that made it did (``loka.update``: one line per step); it is not saved."""

    deltas: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def create(
        cls,
        deltas: dict[str, torch.Tensor],
        *,
        method: str,
        hparams: dict,
        requests: list[dict],
        handle: ModelHandle,
        extra: dict | None = None,
        kind: str = "weight-delta",
    ) -> Artifact:
        """``kind`` is ``weight-delta`` (tensors are added to parameters), ``context`` (tensors are a
        fact store that applying attaches to the model and that scoring/generation consult) or
        ``memory`` (tensors are a codebook that the method's ``attach`` installs as a forward hook on
        the module named in ``extra["module"]``; weights never change) or ``adapter`` (LoRA factors
        ``<weight>.lora_A/B`` whose merged product is added like a weight delta); :func:`bundle_artifacts`
        makes ``bundle`` (several artifacts of any kind applied in order)."""
        deltas = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in deltas.items()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "method": method,
            "hparams": hparams,
            "requests": requests,
            "model": {
                "name": handle.name,
                "hash": handle.model_hash,
                "family": handle.spec.family,
                "source": handle.source,
            },
            "params": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in deltas.items()
            },
            "loka_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "extra": extra or {},
        }
        manifest["id"] = content_id(manifest, deltas)
        return cls(deltas, manifest)

    # -- identity ---------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.manifest.get("id", "")

    @property
    def method(self) -> str:
        return self.manifest.get("method", "?")

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "weight-delta")

    def __repr__(self) -> str:
        return f"Artifact(id={self.id}, method={self.method}, params={list(self.deltas)})"

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """The additive update of each parameter: the tensors themselves for ``weight-delta``, the
        merged ``scaling · B A`` of each target for an ``adapter`` (LoRA), nothing for the others."""
        if self.kind == "weight-delta":
            return self.deltas
        if self.kind != "adapter":
            return {}

        ad = self.manifest.get("extra", {}).get("adapter", {})
        try:
            return {
                n: merged_adapter(
                    self.deltas[f"{n}.lora_A"],
                    self.deltas[f"{n}.lora_B"],
                    float(ad["scaling"]),
                    bool(ad.get("transposed", False)),
                )
                for n in ad["targets"]
            }
        except KeyError as e:
            raise ArtifactError(f"adapter artifact {self.id} lacks {e}; it is corrupt") from None

    # -- apply / revert ---------------------------------------------------------------------
    def parts(self) -> list[Artifact]:
        """The artifacts a ``bundle`` holds, in application order (see :func:`bundle_artifacts`)."""
        if self.kind != "bundle":
            return [self]
        out = []
        for i, m in enumerate(self.manifest.get("extra", {}).get("parts", [])):
            pre = f"{i}/"
            out.append(Artifact({k[len(pre) :]: v for k, v in self.deltas.items() if k.startswith(pre)}, m))
        return out

    def check_compatible(self, target, *, force: bool = False) -> nn.Module:
        if self.kind == "bundle":
            for p in self.parts():
                model = p.check_compatible(target, force=force)
            return model
        model, model_hash = _model_of(target)
        want = self.manifest.get("model", {}).get("hash")
        if model_hash is not None and want and model_hash != want and not force:
            raise ArtifactError(
                f"artifact {self.id} was made for model {self.manifest['model'].get('name')} "
                f"(hash {want[:12]}), not for this one (hash {model_hash[:12]}); load the same model, "
                "or pass force=True / --force if you know the weights match"
            )
        if self.kind == "context":
            return model
        if self.kind == "memory":
            path = self.manifest.get("extra", {}).get("module", "")
            try:
                model.get_submodule(path)
            except AttributeError:
                raise ArtifactError(
                    f"artifact {self.id} hooks module {path!r}, which this model does not have"
                ) from None
            return model
        for name, delta in self.weight_deltas().items():
            try:
                p = model.get_parameter(name)
            except AttributeError:
                raise ArtifactError(
                    f"artifact {self.id} edits {name!r}, which this model does not have"
                ) from None
            if tuple(p.shape) != tuple(delta.shape):
                raise ArtifactError(
                    f"artifact {self.id}: {name} has shape {tuple(delta.shape)}, model has {tuple(p.shape)}"
                )
        return model

    def apply(self, target, *, force: bool = False) -> Artifact:
        """Add the deltas to the model (a handle or a module), remembering the originals."""
        model = self.check_compatible(target, force=force)
        clash = {i: by for i, by in applied_lineage(model).items() if i in lineage(self)}
        if clash:
            i, by = next(iter(clash.items()))
            what = "is already applied" if i == self.id == by else f"shares {i} with applied artifact {by}"
            raise ArtifactError(
                f"artifact {self.id} {what} to this model; revert it first (an update applied twice counts twice)"
            )
        if self.kind == "bundle":  # the parts, in order; a failing part undoes the ones before it
            done = []
            try:
                for p in self.parts():
                    done.append(p.apply(target, force=force))
            except Exception:
                for p in reversed(done):
                    p.revert(target)
                raise
            return self
        if self.kind == "context":  # no weight changes: scoring consults the fact store (loka.runtime)
            runtime.add_context(model, self)
            return self
        if self.kind == "memory":  # no weight changes: the method's hooks are installed
            attach = MEMORY_KINDS.get(self.method)
            if attach is None:
                raise ArtifactError(
                    f"artifact {self.id} is a memory of method {self.method!r}, which this loka does not know; "
                    "import loka.methods (loka.load_artifact does) or upgrade loka"
                )
            mem = model.__dict__.setdefault(MEMORY_ATTR, [])
            mem.append((self, attach(model, self)))
            return self
        stack = model.__dict__.setdefault(_STACK_ATTR, [])
        if any(a.id == self.id for a, _ in stack):
            raise ArtifactError(f"artifact {self.id} is already applied to this model")
        deltas = self.weight_deltas()
        backup = {n: model.get_parameter(n).detach().clone() for n in deltas}
        with torch.no_grad():
            for n, d in deltas.items():
                p = model.get_parameter(n)
                p.add_(d.to(p.device, p.dtype))
        stack.append((self, backup))
        return self

    def revert(self, target) -> Artifact:
        """Undo :meth:`apply` exactly (bit for bit), also when later artifacts were applied after it."""
        model, _ = _model_of(target)
        if self.kind == "bundle":
            for p in reversed(self.parts()):
                p.revert(target)
            return self
        if self.kind == "context":
            if not runtime.remove_context(model, self.id):
                raise ArtifactError(f"artifact {self.id} is not applied to this model")
            return self
        if self.kind == "memory":
            mem = model.__dict__.get(MEMORY_ATTR, [])
            pos = next((i for i, (a, _) in enumerate(mem) if a.id == self.id), None)
            if pos is None:
                raise ArtifactError(f"artifact {self.id} is not applied to this model")
            mem.pop(pos)[1].remove()
            return self
        stack = model.__dict__.get(_STACK_ATTR, [])
        pos = next((i for i, (a, _) in enumerate(stack) if a.id == self.id), None)
        if pos is None:
            raise ArtifactError(f"artifact {self.id} is not applied to this model")
        later = stack[pos + 1 :]
        with torch.no_grad():
            for _, backup in reversed(stack[pos:]):  # unwind to the state before this artifact
                for n, t in backup.items():
                    model.get_parameter(n).copy_(t)
        del stack[pos:]
        for art, _ in later:  # re-apply the later ones on top of the restored weights
            art.apply(model, force=True)
        return self

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write ``path`` (a folder, conventionally ``*.loka``) atomically. An existing folder is replaced
        only if it is a loka artifact and ``force`` is true; anything else at ``path`` is refused."""
        path = check_artifact_output(path, force=force)
        with atomic_dir(path) as tmp:
            save_safetensors(self.deltas, tmp / "deltas.safetensors", metadata={"loka_artifact": self.id})
            manifest = dict(self.manifest, tensors_sha256=sha256_file(tmp / "deltas.safetensors"))
            atomic_write_json(tmp / "manifest.json", manifest)
        self.manifest = manifest
        return path

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Read and verify an artifact folder (see the module docstring for what is checked). The two
        files are read through one open handle of the folder, so a concurrent replacement is seen
        whole or not at all."""
        path = Path(path)
        recover_dir(path)
        deadline = time.monotonic() + READ_RETRY_SECONDS
        attempt = 0
        while True:
            try:
                return cls._load_once(path)
            except _Replaced:  # a writer swapped the folder while we read it: read the new one
                attempt += 1
                if time.monotonic() > deadline:
                    raise ArtifactError(f"{path} kept changing while being read; try again") from None
                time.sleep(min(0.05, 0.001 * attempt))

    @classmethod
    def _load_once(cls, path: Path) -> Artifact:
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArtifactError(f"{path} is not an artifact folder: it does not exist") from None
        except NotADirectoryError:
            raise ArtifactError(
                f"{path} is not an artifact folder (expected manifest.json + deltas.safetensors)"
            ) from None
        except OSError as e:
            raise ArtifactError(f"{path} cannot be opened ({e.strerror})") from None
        st0 = os.fstat(dfd)
        try:
            manifest, data = cls._read_files(path, dfd)
        except ArtifactError:
            if not _still_at(path, st0):  # replaced while we read: read the new one
                raise _Replaced from None
            raise
        finally:
            os.close(dfd)
        if sha256_bytes(data) != manifest["tensors_sha256"]:
            raise ArtifactError(
                f"{path}/deltas.safetensors does not match the sha256 in its manifest: the artifact is corrupt "
                "or was modified"
            )
        try:
            deltas = safetensors_load(data)
        except Exception as e:  # safetensors' own error types differ between versions
            raise ArtifactError(f"{path}/deltas.safetensors is not a valid safetensors file ({e})") from None
        params = manifest["params"]
        if set(deltas) != set(params):
            raise ArtifactError(f"{path}: tensors do not match the manifest's parameter list")
        for k, t in deltas.items():
            want = params[k]
            if list(t.shape) != list(want.get("shape", [])) or str(t.dtype).removeprefix(
                "torch."
            ) != want.get("dtype"):
                raise ArtifactError(
                    f"{path}: tensor {k} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, the manifest says "
                    f"{want.get('dtype')} {want.get('shape')}: the artifact is corrupt"
                )
        if manifest["format_version"] == 1:  # ids of the first format hashed fewer fields
            manifest = dict(manifest, id_v1=manifest["id"], id=content_id(manifest, deltas))
        elif content_id(manifest, deltas) != manifest["id"]:
            raise ArtifactError(
                f"{path}: its id {manifest['id']} is not derived from its content (tensors and manifest): the "
                "artifact was modified or its id copied from another"
            )
        return cls(deltas, manifest)

    @classmethod
    def _read_files(cls, path: Path, dfd: int) -> tuple[dict, bytes]:
        names = set(os.listdir(dfd))
        if not names:
            raise ArtifactError(f"{path} is an empty folder, not an artifact")
        missing = [f for f in FILES if f not in names]
        if missing:
            raise ArtifactError(
                f"{path} is incomplete: needs manifest.json and deltas.safetensors (missing {', '.join(missing)})"
            )
        try:
            manifest = read_json("manifest.json", MAX_MANIFEST_BYTES, dir_fd=dfd, what=str(path))
        except InputError as e:
            raise ArtifactError(f"{e}; the artifact is corrupt") from None
        cls._check_manifest(path, manifest)
        bound = (
            8
            + 65536
            + 512 * len(manifest["params"])
            + sum(
                _DTYPE_BYTES.get(str(m.get("dtype")), 8) * math.prod(int(x) for x in m.get("shape", []))
                for m in manifest["params"].values()
            )
        )
        try:
            data = read_regular("deltas.safetensors", bound, dir_fd=dfd, what=str(path))
        except InputError as e:
            raise ArtifactError(f"{e}; the artifact is corrupt") from None
        return manifest, data

    @staticmethod
    def _check_manifest(path: Path, manifest: Any) -> None:
        mf = f"{path}/manifest.json"
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{mf} is not a JSON object; the artifact is corrupt")
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{mf} is not a loka artifact manifest (format={manifest.get('format')!r})")
        version = manifest.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ArtifactError(f"{mf}: format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{path} needs a newer loka (format_version {version}; this loka reads "
                f"up to {FORMAT_VERSION})"
            )
        missing = [f for f in REQUIRED_FIELDS if f not in manifest]
        if missing:
            raise ArtifactError(
                f"{mf} lacks required field(s) {', '.join(missing)}; the artifact is incomplete "
                "or was edited by hand"
            )
        model = manifest["model"]
        if not isinstance(model, dict) or not isinstance(model.get("hash"), str) or not model["hash"]:
            raise ArtifactError(
                f"{mf}: field model must record the model's hash; the artifact was edited by hand"
            )
        params = manifest["params"]
        if not isinstance(params, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("shape"), list) for v in params.values()
        ):
            raise ArtifactError(f"{mf}: field params must map each tensor to its shape and dtype")
        for k in ("id", "tensors_sha256", "kind", "method"):
            if not isinstance(manifest[k], str):
                raise ArtifactError(f"{mf}: field {k} must be a string")
        if not isinstance(manifest["requests"], list) or not isinstance(manifest["hparams"], dict):
            raise ArtifactError(f"{mf}: fields requests (a list) and hparams (an object) are malformed")

    def summary(self) -> dict[str, Any]:
        """The manifest plus, under ``deltas``, the shape and dtype of each delta (the merged update of
        an adapter, the stored tensors of a memory or context) with its norm where it holds values
        (:func:`holds_values`: not for index tensors); ``delta_norms`` has those norms alone (what
        ``loka inspect`` prints)."""
        out = {k: v for k, v in self.manifest.items() if k != "requests"}
        out["n_requests"] = len(self.manifest.get("requests", []))
        out["requests"] = self.manifest.get("requests", [])
        shown = self.weight_deltas() or self.deltas
        out["deltas"] = {
            k: {
                "shape": list(v.shape),
                "dtype": str(v.dtype).removeprefix("torch."),
                **({"norm": round(float(v.norm()), 6)} if holds_values(k, v) else {"indices": True}),
            }
            for k, v in shown.items()
        }
        out["delta_norms"] = {k: d["norm"] for k, d in out["deltas"].items() if "norm" in d}
        return out


def load_artifact(path: str | Path) -> Artifact:
    """Load an artifact folder, checking its sha256 (see :meth:`Artifact.load`)."""
    return Artifact.load(path)


def stack_artifacts(artifacts: list[Artifact]) -> Artifact:
    """One artifact whose deltas are the sums of several (all made for the same model)."""
    if not artifacts:
        raise ArtifactError("nothing to stack")
    hashes = {a.manifest.get("model", {}).get("hash") for a in artifacts}
    if len(hashes) > 1:
        raise ArtifactError("cannot stack artifacts made for different models")
    if any(a.kind not in ("weight-delta", "adapter") for a in artifacts):
        raise ArtifactError(
            "only weight-delta and adapter artifacts can be stacked; apply context and memory "
            "artifacts (fact stores, codebooks) side by side"
        )
    deltas: dict[str, torch.Tensor] = {}
    for a in artifacts:  # adapters are merged into plain deltas
        for k, v in a.weight_deltas().items():
            deltas[k] = deltas[k] + v if k in deltas else v.clone()
    base = artifacts[0].manifest
    manifest = dict(
        base,
        format_version=FORMAT_VERSION,
        method="stack",
        kind="weight-delta",
        hparams={},
        requests=[r for a in artifacts for r in a.manifest.get("requests", [])],
        parents=[a.id for a in artifacts],
        params={k: {"shape": list(v.shape), "dtype": "float32"} for k, v in deltas.items()},
    )
    manifest.pop("tensors_sha256", None)
    manifest["id"] = content_id(manifest, deltas)
    return Artifact(deltas, manifest)


def bundle_artifacts(artifacts: list[Artifact]) -> Artifact:
    """One artifact (kind ``bundle``) holding several of any kind, applied in order and reverted in
    reverse: what a two-step update with a memory or context method (GRACE, WISE, SCR, then a forget
    step) returns, since such artifacts cannot be summed into one weight delta."""
    if not artifacts:
        raise ArtifactError("nothing to bundle")
    hashes = {a.manifest.get("model", {}).get("hash") for a in artifacts}
    if len(hashes) > 1:
        raise ArtifactError("cannot bundle artifacts made for different models")
    parts = [p for a in artifacts for p in a.parts()]
    deltas = {f"{i}/{k}": v for i, p in enumerate(parts) for k, v in p.deltas.items()}
    manifests = [{k: v for k, v in p.manifest.items() if k != "tensors_sha256"} for p in parts]
    base = parts[0].manifest
    manifest = dict(
        base,
        format_version=FORMAT_VERSION,
        method="bundle",
        kind="bundle",
        hparams={},
        requests=[r for p in parts for r in p.manifest.get("requests", [])],
        parents=[p.id for p in parts],
        params={k: {"shape": list(v.shape), "dtype": "float32"} for k, v in deltas.items()},
        extra={"parts": manifests},
    )
    manifest.pop("tensors_sha256", None)
    manifest["id"] = content_id(manifest, deltas)
    return Artifact(deltas, manifest)
