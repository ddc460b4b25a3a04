"""Text corpora for second-moment statistics.

Sources: text files (one text per blank-line-separated paragraph), JSONL with a ``text`` field, a
local ``datasets`` folder (``save_to_disk``), and the default, text sampled from the model itself.

Why self-sampled text is the default: the statistics estimate which key directions the model uses
on *ordinary* text so that an edit disturbs them least. The original recipe uses Wikipedia, which
cannot be downloaded here; the model's own samples come from (an approximation of) its training
distribution, need nothing from outside, and are reproducible from a seed. They are cached.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from . import env
from .errors import LokaError
from .hf_compat import generate as hf_generate
from .resources import data_dir
from .utils.io import atomic_write_bytes, check_regular, hash_json, read_text, sha256_file
from .utils.progress import bar as progress_bar

if TYPE_CHECKING:
    from .models.loader import ModelHandle

log = logging.getLogger(__name__)


class Corpus(Protocol):
    def fingerprint(self) -> str: ...

    def texts(self) -> Iterator[str]: ...


@dataclass
class TextFilesCorpus:
    paths: list[Path]

    def fingerprint(self) -> str:
        return hash_json(["textfiles", [sha256_file(p) for p in self.paths]])

    def texts(self) -> Iterator[str]:
        for p in self.paths:
            for para in read_text(p).split("\n\n"):
                if para.strip():
                    yield para.strip()


@dataclass
class JsonlCorpus:
    path: Path
    field: str = "text"

    def fingerprint(self) -> str:
        return hash_json(["jsonl", sha256_file(self.path), self.field])

    def texts(self) -> Iterator[str]:
        with open(self.path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LokaError(f"{self.path}:{n}: malformed JSON line ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(self.field), str):
                    raise LokaError(f"{self.path}:{n}: record has no string field {self.field!r}")
                yield rec[self.field]


@dataclass
class DatasetFolderCorpus:
    path: Path
    field: str = "text"

    def fingerprint(self) -> str:
        files = sorted(p for p in self.path.rglob("*") if p.is_file())
        return hash_json(
            ["datasets", [(str(p.relative_to(self.path)), sha256_file(p)) for p in files], self.field]
        )

    def texts(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError as e:
            raise LokaError(
                "reading a datasets folder needs the 'datasets' package: pip install datasets"
            ) from e
        ds = datasets.load_from_disk(str(self.path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        for rec in ds:
            yield rec[self.field]


SEED_PREFIXES = [
    "The",
    "In",
    "A",
    "It",
    "When",
    "This",
    "He",
    "She",
    "We",
    "There",
    "After",
    "According to",
    "One of the",
    "Many",
    "The city of",
    "During the",
    "Scientists",
    "The history of",
    "In 19",
    "Today",
    "The company",
    "His",
    "Her",
    "Although",
    "The first",
    "Most",
    "If you",
    "On the",
    "For example,",
    "Because",
]


@dataclass
class SelfSampledCorpus:
    """Text sampled from the model (seeded, cached as JSONL under ``$LOKA_HOME/corpora``)."""

    handle: object
    n_tokens: int = 20_000
    seed: int = 0
    max_new_tokens: int = 64
    batch_size: int = 128

    def fingerprint(self) -> str:
        return hash_json(["self", self.handle.model_hash, self.n_tokens, self.seed, self.max_new_tokens, 1])

    def path(self) -> Path:
        return env.cache_dir("corpora") / f"self-{self.fingerprint()[:20]}.jsonl"

    def texts(self) -> Iterator[str]:
        p = self.path()
        if not p.exists():
            self._generate(p)
        yield from JsonlCorpus(p).texts()

    @torch.no_grad()
    def _generate(self, out: Path) -> None:
        model, tok = self.handle.model, self.handle.tokenizer
        gen = torch.Generator().manual_seed(self.seed)
        texts: list[str] = []
        done = 0
        bar = progress_bar(total=self.n_tokens, desc="sampling corpus from the model", unit="tok")
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            while done < self.n_tokens:
                idx = torch.randint(len(SEED_PREFIXES), (self.batch_size,), generator=gen).tolist()
                prompts = [SEED_PREFIXES[i] for i in idx]
                enc = tok(prompts, return_tensors="pt", padding=True)
                torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
                seqs = hf_generate(
                    model,
                    enc["input_ids"],
                    enc["attention_mask"],
                    do_sample=True,
                    top_p=0.95,
                    temperature=1.0,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                )
                for row in seqs:
                    t = tok.decode(row, skip_special_tokens=True).strip()
                    n = len(tok(t)["input_ids"])
                    if n >= 8:
                        texts.append(t)
                        done += n
                        bar.update(n)
        finally:
            tok.padding_side = old_side
            bar.close()
        atomic_write_bytes(out, "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
        log.info("sampled %d texts (%d tokens) -> %s", len(texts), done, out)


def tofu_corpus() -> Corpus:
    """The bundled TOFU question+answer texts (retain and forget10 sets, 600 paragraphs, ~40k tokens of English
    prose) as a corpus. For models whose self-sampling is too slow on a CPU (Gemma 3 samples at well
    under 1 token/s here: most of its samples end at once, at full-length cost). Shipped as package data."""
    data = data_dir() / "tofu"
    names = ["retain_perturbed_subset_reconstructed.json", "forget10_reconstructed.json"]
    if not all((data / n).exists() for n in names):
        raise LokaError(
            f"corpus 'tofu' needs {data} (package data; reinstall loka) or pass a .txt/.jsonl file instead"
        )
    texts = [f"{r['question']} {r['answer']}" for n in names for r in json.loads((data / n).read_text())]
    out = env.cache_dir("corpus") / f"tofu-{hash_json(texts)[:16]}.jsonl"
    if not out.exists():
        atomic_write_bytes(out, "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    return JsonlCorpus(out)


def corpus_from_spec(spec: str | None, handle: ModelHandle, n_tokens: int = 20_000) -> Corpus:
    """``self`` / ``self:SEED`` (default), ``tofu`` (bundled texts), a ``.txt`` file, a ``.jsonl``
    file, or a ``datasets`` folder."""
    if spec == "tofu":
        return tofu_corpus()
    if spec in (None, "", "self"):
        return SelfSampledCorpus(handle, n_tokens=n_tokens)
    if spec.startswith("self:"):
        return SelfSampledCorpus(handle, n_tokens=n_tokens, seed=int(spec.split(":", 1)[1]))
    p = Path(spec).expanduser()
    if p.is_dir():
        return DatasetFolderCorpus(p)
    if not p.exists():
        raise LokaError(
            f"corpus {spec!r} not found: pass 'self', a .txt file, a .jsonl file or a datasets folder"
        )
    check_regular(p)  # a FIFO or device would block or never end
    if p.suffix.lower() == ".json":
        raise LokaError(
            f"corpus {p} is a .json file: give plain text (.txt), JSON lines with a 'text' field (.jsonl) "
            "or a datasets folder"
        )
    if p.suffix == ".jsonl":
        return JsonlCorpus(p)
    return TextFilesCorpus([p])
