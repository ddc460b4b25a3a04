"""An edited model written as one GGUF file (what llama.cpp and Ollama load), then read back and checked.

The model's weights (with every applied weight-delta and adapter artifact folded in) are written in
the layout llama.cpp's ``convert_hf_to_gguf.py`` produces, so that transformers' GGUF loader (and
llama.cpp) read back the same model:

* tensor names follow the source GGUF (the file the model was de-quantised from) and the ``gguf``
  package's name map; a model with no source GGUF (a Hugging Face folder, a tiny test model) gets
  the LLaMA names;
* LLaMA's q/k projections are permuted the way llama.cpp's converter does it (rotary halves
  interleaved per head), the exact inverse of transformers' ``_reverse_permute_weights``; Gemma 3
  stores its norms as ``1 + w``;
* 1-D tensors (norms, biases) stay float32; 2-D ones take the chosen type; with a 4-bit type the
  output matrix (the token embedding when tied) is Q8_0, as llama.cpp's quantizer does where Q6_K
  does not fit (Q6_K has no numpy quantizer); a row length that is no multiple of the 32-value block
  falls back to F16.

All metadata of the source GGUF is copied (architecture, tokenizer vocabulary, scores, types and
merges, special ids, chat template, context length, …) with ``general.file_type`` set to the chosen
type and a ``loka.export`` entry (base model, its hash, the artifacts) by which loka knows its own
file. Without a source GGUF the metadata is built from the config and the tokenizer (LLaMA family,
byte-level BPE tokenizers). The file is written under a temporary name beside its path and renamed
into place after verification; an existing file is replaced only if loka wrote it and ``force``.

Verification loads the file back with transformers' GGUF loader and scores every applied artifact's
requests on it and on the in-memory model: whether the rewrite still succeeds (the new target beats
the old one, as CounterFact's ES; the target is the greedy answer when no old one is given; a
forgotten answer stays off the greedy path), paraphrase and neighbourhood success rates, whether the
tokenizer encodes the prompts identically, and the next-token agreement on the prompts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch

from .. import env
from ..artifact import applied_artifacts
from ..errors import ConfigError, LokaError, ModelError, OutputError
from ..models.catalog import KNOWN_MODELS, cached_folder
from ..models.hooked import check_exportable
from ..scoring import score_targets
from ..utils.io import (
    check_output_file,
    check_regular,
    clean_stale_tmp,
    read_json,
    sha256_file,
    tmp_sibling,
)
from ..version import __version__

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

log = logging.getLogger(__name__)

Quant = Literal["f16", "q8_0", "q4_0", "q4_1"]
QUANTS: tuple[str, ...] = get_args(Quant)
#: the GGUF metadata key that marks a file loka wrote (a JSON string: base model, hash, artifacts)
MARKER_KEY = "loka.export"
MARKER_FORMAT = "loka-export"
#: GGUF architectures whose tensor layout this writer inverts
ARCHITECTURES = ("llama", "gemma3")
#: model types whose metadata can be built without a source GGUF (written as ``llama``)
BUILDABLE = ("llama", "smollm3", "mistral")
#: prompts for the next-token comparison when the applied artifacts carry none
PROBE_PROMPTS = ("The capital of France is", "The Eiffel Tower is located in the city of")


# -- results ---------------------------------------------------------------------------------------
@dataclass
class RequestCheck:
    """One request of an applied artifact scored on the in-memory model (``before``) and on the model
    read back from the file (``after``)."""

    artifact: str
    text: str
    target: str
    kind: Literal["edit", "forget"]
    before: bool
    after: bool
    paraphrase_before: float | None = None
    paraphrase_after: float | None = None
    neighborhood_before: float | None = None
    neighborhood_after: float | None = None

    @property
    def survived(self) -> bool:
        return self.before and self.after


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote and, when verified, what the file does compared with the model."""

    path: Path
    quant: str
    bytes: int
    seconds: float
    metadata_from: str  # the source GGUF's file name, or "config" when built from config and tokenizer
    tensor_types: dict[str, int]
    artifacts: list[dict]
    verified: bool = False
    verify_seconds: float | None = None
    requests: list[RequestCheck] = field(default_factory=list)
    tokenizer_identical: bool | None = None
    top1_agreement: float | None = None  # next token after each probe prompt: same argmax in both
    max_logit_diff: float | None = None  # largest |logit difference| at those positions
    n_requests: int | None = None  # the requests verified: those in ``requests`` and those naming no answer

    @property
    def succeeded(self) -> list[RequestCheck]:
        """The requests that succeed on the in-memory model (the ones an export can lose)."""
        return [r for r in self.requests if r.before]

    @property
    def survived(self) -> list[RequestCheck]:
        return [r for r in self.requests if r.survived]

    @property
    def lost(self) -> list[RequestCheck]:
        return [r for r in self.requests if r.before and not r.after]

    @property
    def not_held(self) -> list[RequestCheck]:
        """The requests that fail already on the in-memory model: the export cannot lose them."""
        return [r for r in self.requests if not r.before]

    @property
    def n_unchecked(self) -> int:
        """Requests that name no answer to check (neither a new nor a true target)."""
        return max(0, (self.n_requests or len(self.requests)) - len(self.requests))

    def _survival(self) -> str:
        """``2 of 2 edits survived q8_0 (rewrite)``, saying also what became of the other requests."""
        held = f"{len(self.survived)} of {len(self.succeeded)} edits"
        others = []
        total = len(self.requests) + self.n_unchecked
        if self.not_held:
            others.append(f"{len(self.not_held)} of {total} requests did not hold before export")
        if self.n_unchecked:
            others.append(f"{self.n_unchecked} of {total} name no answer to check")
        if not others:
            return f"{held} survived {self.quant} (rewrite)"
        return f"{held} that held in memory survived {self.quant} (rewrite; {'; '.join(others)})"

    def summary(self) -> str:
        """One line: how many edits survived (of those that held in memory, and what became of the other
        requests), paraphrase and neighbourhood rates before → after."""
        if not self.verified:
            return f"not verified ({self.quant})"
        parts = []
        if self.requests:
            parts.append(self._survival())
            for name, b, a in (
                ("paraphrases", "paraphrase_before", "paraphrase_after"),
                ("neighbourhood", "neighborhood_before", "neighborhood_after"),
            ):
                pre = _mean([getattr(r, b) for r in self.requests])
                post = _mean([getattr(r, a) for r in self.requests])
                if pre is not None and post is not None:
                    parts.append(f"{name} {pre:.2f} → {post:.2f}")
        else:
            parts.append(f"no requests to check ({self.quant})")
        if self.tokenizer_identical is not None:
            parts.append("tokenizer identical" if self.tokenizer_identical else "tokenizer DIFFERS")
        if self.top1_agreement is not None:
            parts.append(f"next-token agreement {self.top1_agreement:.2f}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["summary"] = self.summary()
        d["n_succeeded"] = len(self.succeeded)
        d["n_survived"] = len(self.survived)
        d["n_not_held"] = len(self.not_held)
        d["n_unchecked"] = self.n_unchecked
        d["n_requests"] = len(self.requests) + self.n_unchecked
        return d


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


# -- the output path -------------------------------------------------------------------------------
def read_marker(path: str | Path) -> dict | None:
    """The ``loka.export`` entry of the GGUF file at ``path``, or ``None`` (not a GGUF, or not loka's)."""
    from gguf import GGUFReader

    try:
        f = GGUFReader(check_regular(path)).fields.get(MARKER_KEY)
        marker = json.loads(f.contents()) if f is not None else None
    except (LokaError, OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def check_gguf_output(path: str | Path, force: bool = False) -> Path:
    """Before any work: may a GGUF file be written at ``path``? A missing path may; a GGUF file loka
    exported only with ``force``; anything else (a folder, a link, a file loka did not write) never."""
    return check_output_file(
        path, is_ours=lambda p: read_marker(p) is not None, what="a GGUF file", force=force
    )


# -- the source GGUF and the tensor layout ---------------------------------------------------------
def source_gguf(handle: ModelHandle) -> Path | None:
    """The GGUF file ``handle``'s base weights were de-quantised from, or ``None`` (a Hugging Face
    folder or a tiny model)."""
    entry = KNOWN_MODELS.get(handle.name)
    if entry is None:
        return None
    with contextlib.suppress(LokaError, OSError):
        folder = cached_folder(handle.name)
        if Path(handle.source).resolve() != folder.resolve():
            return None
        meta = read_json(folder / "loka.json", 1 << 20)
        path = entry.locate(env.cache_dir("gguf"))
        if path.name == meta.get("gguf") and path.is_file():
            return path
    return None


def _arch_enum(arch: str):
    from gguf import MODEL_ARCH_NAMES

    for k, v in MODEL_ARCH_NAMES.items():
        if v == arch:
            return k
    raise ModelError(f"the gguf package does not know the GGUF architecture {arch!r}")


def _gguf_names(handle: ModelHandle, arch: str) -> dict[str, str]:
    """``{GGUF tensor name: parameter name}`` for every parameter of the model (the ``gguf`` package's map
    of Hugging Face names, the one llama.cpp's converter uses)."""
    from gguf import get_tensor_name_map

    names = get_tensor_name_map(_arch_enum(arch), handle.n_layers)
    out: dict[str, str] = {}
    for pname in handle.model.state_dict():
        base, _, suffix = pname.rpartition(".")
        g = names.get_name(base)
        if g is not None:
            out[f"{g}.{suffix}"] = pname
    return out


def _to_gguf_layout(arch: str, name: str, w: np.ndarray, config) -> np.ndarray:
    """A parameter as llama.cpp stores it: the inverse of what transformers' GGUF loader undoes."""
    if arch == "llama" and w.ndim == 2 and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads
        if ".attn_k." in name:
            heads = config.num_key_value_heads or heads
        # llama.cpp's permute: per head, rows [first half | second half] become interleaved pairs
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if arch == "gemma3" and name.endswith("norm.weight"):
        return w + np.float32(1.0)  # Gemma's RMSNorm scales by 1 + w; llama.cpp stores 1 + w
    return w


def _tensor_type(name: str, w: np.ndarray, quant: str, tied: bool):
    """The GGML type a tensor is stored in (llama.cpp's convention, see the module docstring)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if w.ndim < 2:
        return T.F32
    base = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}[quant]
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_output and base in (T.Q4_0, T.Q4_1):
        base = T.Q8_0
    if base != T.F16 and w.shape[-1] % GGML_QUANT_SIZES[base][0]:
        log.info("%s: rows of %d values are no whole %s blocks; stored as F16", name, w.shape[-1], base.name)
        base = T.F16
    return base


def _encode(w: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype == T.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(w.astype(np.float16))
    return quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


# -- metadata --------------------------------------------------------------------------------------
def _field_value(f) -> tuple[Any, Any, Any]:
    """(value, type, sub type) of a reader field, strings kept as raw bytes (copied exactly)."""
    from gguf import GGUFValueType as V

    main = f.types[0]
    if main == V.ARRAY:
        sub = f.types[-1]
        if len(f.types) != 2:
            raise ModelError(f"GGUF metadata {f.name!r} is a nested array, which this writer does not copy")
        if sub == V.STRING:
            return [bytes(f.parts[i].tobytes()) for i in f.data], main, sub
        return f.contents(), main, sub
    if main == V.STRING:
        return bytes(f.parts[-1].tobytes()), main, None
    return f.contents(), main, None


def _copy_metadata(writer, reader) -> None:
    skip = {"general.architecture", "general.file_type", "general.quantization_version", MARKER_KEY}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        value, vtype, sub = _field_value(f)
        if key == "general.alignment":
            writer.data_alignment = int(value)
        writer.add_key_value(key, value, vtype, sub)


def _built_metadata(writer, handle: ModelHandle) -> None:
    """LLaMA metadata from the config and a byte-level BPE tokenizer (no source GGUF to copy)."""
    from gguf import GGUFValueType as V
    from gguf import TokenType

    cfg = handle.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ModelError(
            f"{handle.name} uses {rope_type!r} rotary scaling, which GGUF export built from a config does not "
            "write; export it as a Hugging Face folder (--format hf)"
        )
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta or getattr(cfg, "rope_theta", 10000.0)
    a = "llama"
    writer.add_string("general.name", handle.name)
    for key, value in (
        (f"{a}.context_length", cfg.max_position_embeddings),
        (f"{a}.embedding_length", cfg.hidden_size),
        (f"{a}.block_count", cfg.num_hidden_layers),
        (f"{a}.feed_forward_length", cfg.intermediate_size),
        (f"{a}.attention.head_count", heads),
        (f"{a}.attention.head_count_kv", cfg.num_key_value_heads or heads),
        (f"{a}.rope.dimension_count", head_dim),
        (f"{a}.vocab_size", cfg.vocab_size),
    ):
        writer.add_uint32(key, int(value))
    if head_dim != cfg.hidden_size // heads:
        writer.add_uint32(f"{a}.attention.key_length", int(head_dim))
        writer.add_uint32(f"{a}.attention.value_length", int(head_dim))
    writer.add_float32(f"{a}.rope.freq_base", float(theta))
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps))

    tok = handle.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ModelError(
            f"GGUF export of {handle.name} needs its source GGUF or a byte-level BPE tokenizer to describe in "
            "GGUF metadata; load the model from its GGUF (a registered name) or export a Hugging Face folder (--format hf)"
        )
    n = int(cfg.vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(TokenType.UNUSED)] * n
    for piece, i in model.get("vocab", {}).items():
        if i < n:
            tokens[i], types[i] = piece, int(TokenType.NORMAL)
    for t in spec.get("added_tokens") or []:
        if t["id"] < n:
            tokens[t["id"]] = t["content"]
            types[t["id"]] = int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_key_value("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING)
    writer.add_key_value("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if merges:
        writer.add_key_value("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING)
    else:  # no merges: readers derive them from scores, which then yield none
        writer.add_key_value("tokenizer.ggml.scores", [0.0] * n, V.ARRAY, V.FLOAT32)
    for key, tid in (
        ("bos_token_id", tok.bos_token_id if tok.bos_token_id is not None else cfg.bos_token_id),
        ("eos_token_id", tok.eos_token_id if tok.eos_token_id is not None else cfg.eos_token_id),
        ("unknown_token_id", tok.unk_token_id),
        ("padding_token_id", tok.pad_token_id if tok.pad_token_id is not None else cfg.pad_token_id),
    ):
        if isinstance(tid, int):
            writer.add_uint32(f"tokenizer.ggml.{key}", tid)
    writer.add_bool("tokenizer.ggml.add_bos_token", bool(getattr(tok, "add_bos_token", False)))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_string("tokenizer.chat_template", template)
    log.warning(
        "%s has no source GGUF: metadata built from its config and tokenizer (pre-tokenizer 'default'; "
        "llama.cpp may split text differently from the original tokenizer)",
        handle.name,
    )


@contextlib.contextmanager
def _quiet_writer():
    """The ``gguf`` writer's INFO lines (endianness, the file plan) are noise beside loka's own."""
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _artifact_list(handle: ModelHandle) -> list[dict]:
    return [{"id": a.id, "method": a.method, "kind": a.kind} for a in applied_artifacts(handle.model)]


# -- writing ---------------------------------------------------------------------------------------
def _write(
    handle: ModelHandle, tmp: Path, quant: str, source: Path | None, path: Path
) -> tuple[str, dict[str, int]]:
    """Write the GGUF meant for ``path`` to ``tmp``; returns (where the metadata came from, tensor type counts)."""
    from gguf import GGUFReader, GGUFWriter, LlamaFileType

    reader = GGUFReader(source) if source is not None else None
    if reader is not None:
        arch = str(reader.fields["general.architecture"].contents())
    else:
        mt = handle.config.model_type
        if mt not in BUILDABLE:
            raise ModelError(
                f"GGUF export needs a LLaMA-family model or one loaded from its GGUF file: {handle.name} is "
                f"{mt!r}; export it as a Hugging Face folder (--format hf)"
            )
        arch = "llama"
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"GGUF export writes the {' and '.join(ARCHITECTURES)} layouts; {handle.name}'s GGUF is {arch!r}: "
            "export it as a Hugging Face folder (--format hf)"
        )
    log.info("writing %s as GGUF %s to %s", handle.name, quant, path)
    by_gguf = _gguf_names(handle, arch)
    order = [t.name for t in reader.tensors] if reader is not None else list(by_gguf)
    state = handle.model.state_dict()
    tied = "output.weight" not in order
    if tied and "output.weight" in by_gguf:
        out_w, emb_w = state[by_gguf["output.weight"]], state[by_gguf["token_embd.weight"]]
        if not torch.equal(out_w, emb_w):
            raise ModelError(
                f"{handle.name}'s output matrix differs from its token embedding, but its GGUF layout ties them; "
                "the export would lose the difference"
            )

    with _quiet_writer():
        writer = GGUFWriter(None, arch)
    if reader is not None:
        _copy_metadata(writer, reader)
    else:
        _built_metadata(writer, handle)
    file_type = {
        "f16": LlamaFileType.MOSTLY_F16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
        "q4_0": LlamaFileType.MOSTLY_Q4_0,
        "q4_1": LlamaFileType.MOSTLY_Q4_1,
    }[quant]
    writer.add_uint32("general.file_type", int(file_type))
    writer.add_uint32("general.quantization_version", 2)
    marker = {
        "format": MARKER_FORMAT,
        "base_model": handle.name,
        "base_hash": handle.model_hash,
        "quant": quant,
        "artifacts": _artifact_list(handle),
        "loka_version": __version__,
    }
    writer.add_string(MARKER_KEY, json.dumps(marker))

    written: set[str] = set()
    types: dict[str, int] = {}
    raw = {t.name: t for t in reader.tensors} if reader is not None else {}
    for name in order:
        pname = by_gguf.get(name)
        if pname is None:  # a tensor the model has no parameter for (e.g. rope_freqs): kept as it was
            t = raw[name]
            writer.add_tensor(name, np.asarray(t.data), raw_dtype=t.tensor_type)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
            log.debug("%s copied unchanged from the source GGUF", name)
            continue
        w = state[pname].detach().to("cpu", torch.float32).numpy()
        w = _to_gguf_layout(arch, name, w, handle.config)
        qtype = _tensor_type(name, w, quant, tied)
        data = _encode(w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        types[qtype.name] = types.get(qtype.name, 0) + 1
        written.add(pname)
    # every parameter must be in the file (or be the tied embedding): a lost one would drop an edit in silence
    ptrs = {state[p].data_ptr() for p in written}
    missing = [p for p, t in state.items() if p not in written and t.data_ptr() not in ptrs]
    if missing:
        raise ModelError(
            f"{handle.name}: parameter {missing[0]} has no tensor in its GGUF layout ({len(missing)} such); "
            "export it as a Hugging Face folder (--format hf)"
        )
    with _quiet_writer():
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    return (source.name if source is not None else "config"), types


def export_gguf(
    handle: ModelHandle,
    path: str | Path,
    *,
    quant: Quant = "q8_0",
    verify: bool = True,
    force: bool = False,
) -> GGUFExport:
    """Write ``handle`` (with its applied artifacts) as the GGUF file ``path`` in ``quant`` (f16, q8_0,
    q4_0 or q4_1) and, with ``verify``, read it back with transformers and check every applied
    artifact's requests on it. Memory and context artifacts are refused (a GGUF holds weights only);
    an existing ``path`` is replaced only if loka wrote it and ``force``. Edits the file loses are
    logged as warnings and listed in the result (:attr:`GGUFExport.lost`)."""
    if quant not in QUANTS:
        raise ConfigError(f"quant {quant!r} is not one of {', '.join(QUANTS)}")
    check_exportable(handle.model)
    path = check_gguf_output(path, force=force)
    source = source_gguf(handle)
    clean_stale_tmp(path)
    tmp = path.parent / tmp_sibling(path)
    t0 = time.time()
    try:
        metadata_from, types = _write(handle, tmp, quant, source, path)
        result = GGUFExport(
            path=path,
            quant=quant,
            bytes=tmp.stat().st_size,
            seconds=round(time.time() - t0, 2),
            metadata_from=metadata_from,
            tensor_types=types,
            artifacts=_artifact_list(handle),
        )
        if verify:
            verify_gguf(handle, tmp, result)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    log.info("wrote %s (%s, %.1f MB) in %.1fs", path, quant, result.bytes / 1e6, result.seconds)
    return result


# -- reading back and checking ---------------------------------------------------------------------
def load_gguf(path: str | Path, *, device=None) -> ModelHandle:
    """A GGUF file read with transformers' GGUF loader (de-quantised to float32) as a loka handle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hf_compat import drop_gguf_quantizer, quiet_progress
    from ..models.loader import _finish

    path = check_regular(path)
    try:
        with quiet_progress():
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=env.MODEL_DTYPE, local_files_only=True
            )
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise ModelError(f"{path} does not load as a GGUF model with transformers ({e})") from e
    drop_gguf_quantizer(model)
    return _finish(model, tok, path.name, str(path), None, lambda: sha256_file(path), env.device(device))


def _request_rows(req: dict) -> tuple[list[tuple[str, str, str]], str | None]:
    """Scoring rows (group, prompt, target) of one request and its kind, or ``None`` when it names no answer."""
    text = req["prompt"].replace("{}", req["subject"], 1)
    new, true = req.get("target_new"), req.get("target_true")
    rows = []
    if new:
        kind = "edit"
        for group, prompts in (
            ("rewrite", [text]),
            ("paraphrase", req.get("paraphrases") or []),
            ("neighborhood", req.get("neighborhood") or [] if true else []),
        ):
            for p in prompts:
                rows.append((group + ":new", p, new))
                if true:
                    rows.append((group + ":true", p, true))
    elif true:
        kind = "forget"
        for group, prompts in (("rewrite", [text]), ("paraphrase", req.get("paraphrases") or [])):
            rows += [(group + ":true", p, true) for p in prompts]
    else:
        return [], None
    return rows, kind


def _mean_lp(s: dict) -> float:
    return float(np.mean(s["token_logprobs"]))


def _greedy(s: dict) -> bool:
    return all(a == t for a, t in zip(s["argmax_ids"], s["target_ids"]))


def _judge(kind: str, groups: dict[str, list[dict]]) -> dict[str, float | None]:
    """Per group: the fraction of prompts where the request holds (ES/PS/NS as CounterFact defines them)."""
    out: dict[str, float | None] = {}
    for g in ("rewrite", "paraphrase", "neighborhood"):
        new, true = groups.get(g + ":new", []), groups.get(g + ":true", [])
        if kind == "forget":
            ok = [not _greedy(t) for t in true]
        elif g == "neighborhood":
            ok = [_mean_lp(t) > _mean_lp(n) for n, t in zip(new, true)]
        elif true:
            ok = [_mean_lp(n) > _mean_lp(t) for n, t in zip(new, true)]
        else:
            ok = [_greedy(n) for n in new]
        out[g] = float(np.mean(ok)) if ok else None
    return out


def applied_requests(handle: ModelHandle) -> list[tuple[str, dict]]:
    """``(artifact id, request)`` for every request of every artifact applied to ``handle``, in order."""
    return [
        (a.id, r)
        for art in applied_artifacts(handle.model)
        for a in art.parts()
        for r in a.manifest.get("requests") or []
        if isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("subject"), str)
    ]


def request_scores(handle: ModelHandle, reqs: list[tuple[str, dict]]) -> list[dict]:
    """Per request (as :func:`applied_requests` lists them): the fraction of its rewrite, paraphrase and
    neighbourhood prompts where it holds on ``handle`` (``{}`` for a request that names no answer)."""
    rows, owner, kinds = [], [], []
    for i, (_, req) in enumerate(reqs):
        r, kind = _request_rows(req)
        kinds.append(kind)
        rows += r
        owner += [i] * len(r)
    scored = score_targets(handle, [p for _, p, _ in rows], [t for _, _, t in rows]) if rows else []
    groups: list[dict[str, list[dict]]] = [{} for _ in reqs]
    for (g, _, _), i, s in zip(rows, owner, scored):
        groups[i].setdefault(g, []).append(s)
    return [_judge(k, g) if k else {} for k, g in zip(kinds, groups)]


@torch.no_grad()
def _next_token_logits(handle: ModelHandle, prompts: list[str]) -> list[torch.Tensor]:
    out = []
    for p in prompts:
        ids = handle.tokenizer(p, return_tensors="pt")["input_ids"].to(handle.device)
        out.append(handle.model(input_ids=ids).logits[0, -1].float().cpu())
    return out


def verify_gguf(
    handle: ModelHandle,
    file: str | Path,
    result: GGUFExport,
    *,
    requests: list[tuple[str, dict]] | None = None,
    before: list[dict] | None = None,
) -> GGUFExport:
    """Read ``file`` back with transformers and fill ``result``'s checks against the in-memory ``handle``.

    ``requests`` (default: the applied artifacts' own, :func:`applied_requests`) are scored on both;
    ``before``, their scores on ``handle`` from :func:`request_scores`, saves scoring them again."""
    t0 = time.time()
    log.info("verifying: reading %s back with transformers", result.path.name)
    back = load_gguf(file, device=handle.device)
    reqs = applied_requests(handle) if requests is None else requests
    checks = []
    if reqs:
        before = request_scores(handle, reqs) if before is None else before
        after = request_scores(back, reqs)
        for (aid, req), b, a in zip(reqs, before, after, strict=True):
            if not b:
                continue
            checks.append(
                RequestCheck(
                    artifact=aid,
                    text=req["prompt"].replace("{}", req["subject"], 1),
                    target=req.get("target_new") or req.get("target_true"),
                    kind="edit" if req.get("target_new") else "forget",
                    before=b["rewrite"] == 1.0,
                    after=a["rewrite"] == 1.0,
                    paraphrase_before=b["paraphrase"],
                    paraphrase_after=a["paraphrase"],
                    neighborhood_before=b["neighborhood"],
                    neighborhood_after=a["neighborhood"],
                )
            )
    prompts = list(dict.fromkeys(c.text for c in checks))[:64] or list(PROBE_PROMPTS)
    enc = lambda tok: [tok(p)["input_ids"] for p in prompts]  # noqa: E731
    result.tokenizer_identical = enc(handle.tokenizer) == enc(back.tokenizer)
    la, lb = _next_token_logits(handle, prompts), _next_token_logits(back, prompts)
    result.top1_agreement = float(np.mean([int(a.argmax() == b.argmax()) for a, b in zip(la, lb)]))
    result.max_logit_diff = max(float((a - b).abs().max()) for a, b in zip(la, lb))
    if not math.isfinite(result.max_logit_diff):
        raise OutputError(f"{result.path}: the file read back gives non-finite logits; it was not written")
    result.requests = checks
    result.n_requests = len(reqs)
    result.verified = True
    result.verify_seconds = round(time.time() - t0, 2)
    for c in result.lost:
        log.warning(
            "edit %r -> %r (artifact %s) did not survive %s: the file read back no longer gives it",
            c.text,
            c.target,
            c.artifact,
            result.quant,
        )
    if result.tokenizer_identical is False:
        log.warning("the tokenizer read back from %s encodes the prompts differently", result.path.name)
    del back
    return result
