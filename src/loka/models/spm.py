"""A SentencePiece backend for tokenizers that are SentencePiece BPE in ``tokenizer.json`` form (Gemma 3).

Why: ``tokenizers`` takes ~0.9 s to build Gemma 3's tokenizer (262,144 pieces, 514,906 merges) and holds
the GIL while it does, which alone breaks a sub-second cached load. SentencePiece loads the same model in
~0.1 s because its BPE needs no merge list: of all adjacent pairs whose concatenation is a piece, it merges
the one whose piece scores highest (leftmost on ties).

The conversion is exact for this shape: piece *i* keeps id *i*, and its score is minus the rank of the
first merge that makes it, so merges fire in the order ``tokenizers`` would fire them. Byte-fallback pieces
``<0xNN>`` become BYTE pieces, added tokens CONTROL (special) or USER_DEFINED pieces; the added-token split,
padding and special tokens are done by transformers' ``SentencePieceBackend`` like any slow tokenizer.
Every conversion is checked against the ``tokenizers`` original on a probe set (ids with and without
special tokens, padded batches, decoded text, decoding of random id sequences) before it is first used;
an unfamiliar shape or any mismatch keeps the ``tokenizers`` path (recorded, so the check runs once per
source file). ``LOKA_TOKENIZER=tokenizers`` always uses ``tokenizers`` (e.g. for offset mappings).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from ..hf_compat import sentencepiece_backend
from ..utils.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

SPM_VERSION = 3
SPM_FILE = "tokenizer.spm"
SPM_META = "tokenizer.spm.meta.json"

_NORMALIZER = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
_PRE_TOKENIZERS = (
    None,
    {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
)
_DECODER = {
    "type": "Sequence",
    "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ],
}
# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


class Unsupported(ValueError):
    """The tokenizer.json is not SentencePiece BPE in a shape this converter reproduces exactly."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes | int | float) -> bytes:
    """One protobuf field: bytes (wire type 2), int (varint, 0) or float (fixed32, 5)."""
    if isinstance(payload, bytes):
        return _varint(num << 3 | 2) + _varint(len(payload)) + payload
    if isinstance(payload, float):
        return _varint(num << 3 | 5) + struct.pack("<f", payload)
    return _varint(num << 3) + _varint(payload)


def _is_byte_piece(t: str) -> bool:
    return len(t) == 6 and t.startswith("<0x") and t.endswith(">")


def bos_of(tj: dict) -> str | None:
    """The token the post-processor puts before a single sequence (None: it adds nothing)."""
    pp = tj.get("post_processor")
    if pp is None:
        return None
    single = pp.get("single") if pp.get("type") == "TemplateProcessing" else None
    if (
        isinstance(single, list)
        and len(single) == 2
        and "SpecialToken" in single[0]
        and single[1].get("Sequence", {}).get("id") == "A"
    ):
        return single[0]["SpecialToken"]["id"]
    raise Unsupported(f"post_processor {pp.get('type')!r} is not '<bos> A'")


def sentencepiece_proto(tj: dict) -> bytes:
    """A serialised SentencePiece ``ModelProto`` (BPE) equivalent to the parsed ``tokenizer.json`` ``tj``.

    Raises :class:`Unsupported` naming the first property that does not fit.
    """
    m = tj.get("model") or {}
    if m.get("type") != "BPE":
        raise Unsupported(f"model type {m.get('type')!r} is not BPE")
    for k, want in (
        ("byte_fallback", True),
        ("dropout", None),
        ("continuing_subword_prefix", None),
        ("end_of_word_suffix", None),
        ("ignore_merges", False),
    ):
        if m.get(k, want) != want:
            raise Unsupported(f"model.{k} is {m.get(k)!r}, not {want!r}")
    if tj.get("normalizer") != _NORMALIZER:
        raise Unsupported("normalizer is not Replace(' ' -> '\u2581')")
    if tj.get("pre_tokenizer") not in _PRE_TOKENIZERS:
        raise Unsupported("pre_tokenizer splits the text")
    if tj.get("decoder") != _DECODER:
        raise Unsupported("decoder is not Replace('\u2581' -> ' '), ByteFallback, Fuse")
    bos_of(tj)
    vocab: dict[str, int] = m["vocab"]
    pieces = [""] * len(vocab)
    for t, i in vocab.items():
        if not 0 <= i < len(pieces) or pieces[i]:
            raise Unsupported("vocabulary ids are not 0..n-1, each once")
        pieces[i] = t
    added = {}
    for a in tj.get("added_tokens") or []:
        if any(a.get(k) for k in ("single_word", "lstrip", "rstrip", "normalized")):
            raise Unsupported(f"added token {a['content']!r} strips, normalises or matches single words")
        if not (0 <= a["id"] < len(pieces) and pieces[a["id"]] == a["content"]):
            raise Unsupported(f"added token {a['content']!r} is not a piece of the vocabulary")
        added[a["id"]] = a
    unk = vocab.get(m.get("unk_token") or "")
    if unk is None:
        raise Unsupported("no unk_token in the vocabulary")
    rank: dict[str, int] = {}
    for r, mg in enumerate(m.get("merges") or []):
        a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise Unsupported(f"merge {mg!r} joins or makes a token outside the vocabulary")
        rank.setdefault(a + b, r)
    out = bytearray()
    for i, t in enumerate(pieces):
        if i == unk:
            typ = _UNKNOWN
        elif i in added:
            typ = _CONTROL if added[i].get("special") else _USER_DEFINED
        elif _is_byte_piece(t):
            typ = _BYTE
        else:
            typ = _NORMAL
            if len(t) > 1 and t not in rank:  # SentencePiece would merge into it; tokenizers never does
                raise Unsupported(f"piece {t!r} is made by no merge")
        score = -float(rank[t]) if t in rank else 0.0
        out += _field(1, _field(1, t.encode("utf-8")) + _field(2, score) + _field(3, typ))
    none = -1 & 0xFFFFFFFFFFFFFFFF  # int32 -1 on the wire: no bos/eos/pad id (added tokens carry them)
    trainer = (
        _field(3, 2)
        + _field(35, 1)
        + _field(40, unk)
        + _field(41, none)
        + _field(42, none)
        + _field(43, none)
    )
    normalizer = (
        _field(1, b"identity") + _field(3, 0) + _field(4, 0) + _field(5, 1)
    )  # no dummy prefix, keep spaces
    return bytes(out + _field(2, trainer) + _field(3, normalizer))


def decode_pieces(pieces: list[str]) -> str:
    """The ``tokenizers`` decoder chain of this shape, step for step: '▁' -> ' ', then byte fallback (a run
    of ``<0xNN>`` pieces becomes its UTF-8 text, or one U+FFFD per piece where the run is not valid UTF-8),
    then fuse. SentencePiece's own decoder differs on invalid runs, so it is not used."""
    out: list[str] = []
    run = bytearray()
    n_run = 0

    def flush() -> None:
        nonlocal n_run
        if n_run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * n_run)
            run.clear()
            n_run = 0

    for p in pieces:
        if _is_byte_piece(p):
            try:
                run.append(int(p[3:5], 16))
                n_run += 1
                continue
            except ValueError:
                pass
        flush()
        out.append(p.replace("\u2581", " "))
    flush()
    return "".join(out)


class SentencePieceTokenizer(sentencepiece_backend()):
    """transformers' slow-tokenizer API over a SentencePiece model converted from a ``tokenizer.json``;
    ``save_pretrained`` writes that original ``tokenizer.json`` + config, not the conversion."""

    vocab_files_names = {"vocab_file": SPM_FILE}

    def __init__(self, vocab_file: str, source_folder: str | None = None, add_bos: str | None = None, **kw):
        self.source_folder = source_folder
        self.add_bos = add_bos
        super().__init__(vocab_file=vocab_file, legacy=True, **kw)

    def _tokenize(self, text, **kw):
        return self.sp_model.encode(text, out_type=str)

    def convert_tokens_to_string(self, tokens):
        return decode_pieces(tokens)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kw):
        """Added tokens as written, vocabulary pieces through ``decode_pieces`` (tokenizers' chain)."""
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        pieces = []
        for i in map(int, ids):
            a = self._added_tokens_decoder.get(i)
            if a is None:
                pieces.append(self.sp_model.id_to_piece(i))
            elif not (skip_special_tokens and a.special):
                pieces.append(a.content)
        text = decode_pieces(pieces)
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        return self.clean_up_tokenization(text) if clean else text

    def build_inputs_with_special_tokens(self, a, b=None):
        pre = [self.convert_tokens_to_ids(self.add_bos)] if self.add_bos else []
        return pre + a if b is None else pre + a + pre + b

    def get_special_tokens_mask(self, a, b=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(a, b, already_has_special_tokens=True)
        pre = [1] if self.add_bos else []
        return pre + [0] * len(a) if b is None else pre + [0] * len(a) + pre + [0] * len(b)

    def save_pretrained(self, save_directory, *args, **kw):
        if not self.source_folder:
            return super().save_pretrained(save_directory, *args, **kw)
        dest = Path(save_directory)
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(self.source_folder) / name
            if src.exists():
                shutil.copyfile(src, dest / name)
                written.append(str(dest / name))
        return tuple(written)


def _probes(added: list[str], seed: int = 0) -> list[str]:
    """Fixed and seeded random strings that exercise whitespace runs, newlines, bytes, unicode and added tokens."""
    rng = random.Random(seed)
    some = rng.sample(added, min(len(added), 64)) if added else []
    fixed = [
        "",
        " ",
        "The Eiffel Tower is in Paris.",
        " Paris",
        "a  b   c    d",
        "\t\tx\r\ny",
        "x\n\n\ny",
        "héllo wörld 日本語 🙂 ﷽ \u200b",
        "1234567890 3.14159",
        "def f(x):\n    return x  # ok\n",
        *(" " * n for n in range(1, 41)),
        *("\n" * n for n in range(1, 6)),
        *(f"x{a}y {a} {a}{a}" for a in some),
    ]
    alphabet = list("ab cdé\n\t\r日本🙂0123456789.,!?-_<>/'\"\u2581") + ["  ", "\n\n", " the", "tion", *some]
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(400)]


def mismatch(tok, ref) -> str | None:
    """The first way ``tok`` differs from the reference tokenizer ``ref`` on the probe set, or None."""
    added = [a.content for a in ref.added_tokens_decoder.values()]
    probes = _probes(added)
    for s in probes:
        for special in (True, False):
            a, b = ref(s, add_special_tokens=special), tok(s, add_special_tokens=special)
            if dict(a) != dict(b):
                return f"encoding {s!r} (special tokens {special}): {dict(a)} != {dict(b)}"
        ids = a["input_ids"]
        for skip in (False, True):
            if ref.decode(ids, skip_special_tokens=skip) != tok.decode(ids, skip_special_tokens=skip):
                return f"decoding the ids of {s!r} (skip special {skip})"
    for kw in ({"padding": True}, {"padding": True, "truncation": True, "max_length": 8}):
        a, b = ref(probes[:48], **kw), tok(probes[:48], **kw)
        if dict(a) != dict(b):
            return f"a batch with {kw}"
    rng = random.Random(1)
    n = len(ref)
    for _ in range(300):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 8))]
        if ref.decode(ids) != tok.decode(ids):
            return f"decoding ids {ids}"
    for attr in (
        "padding_side",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "unk_token_id",
        "model_input_names",
    ):
        if getattr(ref, attr) != getattr(tok, attr):
            return f"{attr}: {getattr(ref, attr)!r} != {getattr(tok, attr)!r}"
    return None


def _build(folder: Path, tj_path: Path, kw: dict, reference: Callable[[], object]) -> dict:
    """Convert, check against the reference and record the outcome in the meta file."""
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    try:
        proto = sentencepiece_proto(tj)
    except Unsupported as e:
        return {"ok": False, "reason": str(e)}
    atomic_write_bytes(folder / SPM_FILE, proto)
    rec = {"ok": True, "added_tokens": tj.get("added_tokens") or [], "add_bos": bos_of(tj)}
    tok = _construct(folder, rec, kw)
    bad = mismatch(tok, reference())
    if bad:
        (folder / SPM_FILE).unlink(missing_ok=True)
        return {"ok": False, "reason": f"differs from tokenizers on {bad}"}
    return rec


def added_token(a: dict):
    """A ``tokenizers.AddedToken`` from its ``tokenizer.json`` record."""
    from tokenizers import AddedToken

    return AddedToken(
        a["content"],
        single_word=a["single_word"],
        lstrip=a["lstrip"],
        rstrip=a["rstrip"],
        normalized=a["normalized"],
        special=a["special"],
    )


def _construct(folder: Path, rec: dict, kw: dict):
    atd = {a["id"]: added_token(a) for a in rec["added_tokens"]}
    return SentencePieceTokenizer(
        str(folder / SPM_FILE),
        source_folder=str(folder),
        add_bos=rec["add_bos"],
        added_tokens_decoder=atd,
        **kw,
    )


def load(folder: Path, stamp: list, kw: dict, reference: Callable[[], object]):
    """The SentencePiece tokenizer of ``folder`` (converted and checked once per ``stamp`` of its
    ``tokenizer.json``), or None where it does not apply: then the caller uses ``tokenizers``."""
    if os.environ.get("LOKA_TOKENIZER", "auto").lower() == "tokenizers":
        return None
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return None
    meta = folder / SPM_META
    stamp = [SPM_VERSION, *stamp]
    rec = None
    with contextlib.suppress(ValueError, OSError, KeyError):
        rec = json.loads(meta.read_text())
        if rec["stamp"] != stamp or (rec["ok"] and not (folder / SPM_FILE).exists()):
            rec = None
    if rec is None:
        try:
            rec = {"stamp": stamp, **_build(folder, folder / "tokenizer.json", kw, reference)}
        except Exception as e:  # SentencePiece refused the model, or the check itself failed
            (folder / SPM_FILE).unlink(missing_ok=True)
            rec = {"stamp": stamp, "ok": False, "reason": f"conversion failed: {type(e).__name__}: {e}"}
        with contextlib.suppress(OSError):  # a read-only cache converts (and checks) again next time
            atomic_write_json(meta, rec)
        if not rec["ok"]:
            log.debug("tokenizer of %s stays on tokenizers: %s", folder, rec["reason"])
    if not rec["ok"]:
        return None
    try:
        return _construct(folder, rec, kw)
    except Exception as e:  # a damaged conversion: drop it; the next load converts again
        log.warning("SentencePiece tokenizer %s is unreadable (%s); using tokenizers", folder / SPM_FILE, e)
        (folder / SPM_FILE).unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        return None
