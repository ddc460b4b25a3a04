"""Second-moment statistics ``C = E[k kᵀ]`` of the keys entering a rewritten matrix.

ROME/MEMIT/AlphaEdit weight their least-squares updates by ``C`` so that keys seen on ordinary
text are disturbed least. Several layers are accumulated in *one* pass over a corpus (the forward
stops after the highest requested layer). Results are cached on disk, keyed by
model hash + module + corpus fingerprint + token count. A cache file is one safetensors file whose
header records the hash of its tensors: it is written under a unique temporary name and renamed, so a
reader sees a whole file or none, and verified before use. Two processes that need the same
statistics do not both compute them: the second waits on a lock file and then reads the first's
result. An interrupted computation resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from . import env
from .corpus import Corpus
from .errors import CacheError, ConfigError, LokaError
from .trace import capture, run_until_stopped
from .utils.io import (
    atomic_write_json,
    clean_stale_tmp,
    hash_tensors,
    read_json,
    read_regular,
    safe_open_bytes,
    save_safetensors,
    sha256_bytes,
    sha256_file,
    tmp_sibling,
)
from .utils.progress import bar as progress_bar

if TYPE_CHECKING:
    from .models.loader import ModelHandle

log = logging.getLogger(__name__)


def _paths(handle: ModelHandle, layer: int, corpus_fp: str, n_tokens: int) -> tuple[Path, Path, Path]:
    d = env.cache_dir("stats") / handle.model_hash[:16] / handle.spec.mlp_out_path(layer)
    stem = f"{corpus_fp[:16]}-{n_tokens}"
    return d / f"{stem}.safetensors", d / f"{stem}.json", d / f"{stem}.partial.safetensors"


def _save_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, its header holding the hash of its tensors; unique temporary name, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)
    tmp = path.parent / tmp_sibling(path)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    try:
        save_safetensors(tensors, tmp, metadata={"content_sha256": hash_tensors(tensors)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_verified(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file if it is whole and matches the hash in its header (or, for a file
    written before headers carried one, the file sha256 in the JSON beside it), else ``None``."""
    try:
        data = read_regular(path, 1 << 34)
        with safe_open_bytes(data) as (tensors, meta):
            if "content_sha256" in meta:
                return tensors if meta["content_sha256"] == hash_tensors(tensors) else None
            side = read_json(path.with_suffix(".json"), 1 << 20)
            if isinstance(side, dict) and side.get("sha256") == sha256_bytes(data):
                return tensors
    except Exception as e:  # unreadable, truncated, not safetensors
        log.debug("statistics cache %s unreadable: %s", path, e)
    return None


@contextlib.contextmanager
def _computing(path: Path):
    """An exclusive lock on ``path``'s statistics while they are computed and written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_cached(handle: ModelHandle, layer: int, corpus_fp: str, n_tokens: int) -> torch.Tensor | None:
    """The cached ``C`` for ``layer``, verified, or ``None`` (missing or failing its check: recomputed)."""
    f, _, _ = _paths(handle, layer, corpus_fp, n_tokens)
    if not f.exists():
        return None
    tensors = _read_verified(f)
    if tensors is None or "mom2" not in tensors:
        log.warning("statistics cache %s failed its check; recomputing", f)
        return None
    return tensors["mom2"]


def _from_cache(handle: ModelHandle, layers: list[int], fp: str, n_tokens: int, out: dict) -> list[int]:
    """Put each cached layer's statistics into ``out``; return the layers still missing."""
    missing = []
    for layer in layers:
        c = load_cached(handle, layer, fp, n_tokens)
        if c is None:
            missing.append(layer)
        else:
            out[layer] = c
    return missing


def second_moments(
    handle: ModelHandle,
    layers: list[int],
    corpus: Corpus,
    n_tokens: int,
    *,
    batch_size: int = 16,
    seq_len: int = 256,
    checkpoint_every: int = 20,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """``{layer: E[k kᵀ]}`` (float32, d_in × d_in) over ``n_tokens`` corpus tokens, from cache if possible."""
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise ConfigError(f"statistics need a positive number of tokens (mom2_n_tokens), got {n_tokens!r}")
    for layer in layers:
        handle.check_layer(layer)
    fp = corpus.fingerprint()
    out: dict[int, torch.Tensor] = {}
    missing = _from_cache(handle, sorted(set(layers)), fp, n_tokens, out)
    if missing:
        lock = _paths(handle, min(missing), fp, n_tokens)[0]
        with _computing(lock):  # another process computing the same statistics finishes first
            still = _from_cache(handle, missing, fp, n_tokens, out)
            if still:
                out.update(
                    _compute(
                        handle, still, corpus, fp, n_tokens, batch_size, seq_len, checkpoint_every, progress
                    )
                )
    return {layer: out[layer] for layer in layers}


@torch.no_grad()
def _compute(
    handle: ModelHandle, layers, corpus, fp, n_tokens, batch_size, seq_len, checkpoint_every, progress
):
    model, tok = handle.model, handle.tokenizer
    paths = {layer: handle.spec.mlp_out_path(layer) for layer in layers}
    d_in = handle.weight(layers[0]).shape[1]
    sums = {layer: torch.zeros(d_in, d_in, dtype=torch.float64) for layer in layers}
    count, texts_done = 0, 0
    # resume: every layer's partial file must agree on where it stopped
    partials = [_paths(handle, layer, fp, n_tokens)[2] for layer in layers]
    if all(p.exists() for p in partials):
        try:
            loaded = [load_file(str(p)) for p in partials]
            states = {(int(t["count"]), int(t["texts_done"])) for t in loaded}
            if len(states) == 1:
                count, texts_done = states.pop()
                for layer, t in zip(layers, loaded):
                    sums[layer] = t["sum"]
                log.info("resuming statistics at %d tokens (%d texts)", count, texts_done)
        except Exception as e:  # a broken partial is simply recomputed
            log.warning("ignoring unreadable partial statistics: %s", e)
            count, texts_done = 0, 0
    stop = paths[max(layers)]
    bar = progress_bar(
        total=n_tokens,
        initial=count,
        desc=f"statistics for layers {layers}",
        unit="tok",
        disable=not progress,
    )
    try:
        t0 = time.time()
        texts_iter = iter(corpus.texts())
        for _ in range(texts_done):
            next(texts_iter, None)
        batches = 0
        exhausted = False
        while count < n_tokens and not exhausted:
            batch = []
            for t in texts_iter:
                batch.append(t)
                if len(batch) == batch_size:
                    break
            else:
                exhausted = True
            if not batch:
                break
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
            mask = enc["attention_mask"].bool()
            with capture(model, list(paths.values()), outputs=False, stop_after=stop) as rec:
                run_until_stopped(lambda enc=enc: model(**enc.to(handle.device)))
            take = min(int(mask.sum()), n_tokens - count)
            for layer, p in paths.items():
                k = rec[p].input[mask][:take].to(env.SOLVE_DTYPE)
                sums[layer] += k.T @ k
            count += take
            texts_done += len(batch)
            batches += 1
            bar.update(take)
            if batches % checkpoint_every == 0 and count < n_tokens:
                for layer, p in zip(layers, partials):
                    _save_tensor_file(
                        p,
                        {
                            "sum": sums[layer],
                            "count": torch.tensor(count),
                            "texts_done": torch.tensor(texts_done),
                        },
                    )
    finally:  # closed before any error is printed
        bar.close()
    if count < d_in:  # fewer keys than dimensions: E[k kᵀ] is singular, every solve with it meaningless
        raise LokaError(
            f"the statistics corpus gave {count} tokens, fewer than the {d_in} dimensions of the keys: pass a "
            "corpus with more text (mom2_corpus / --corpus); nothing was cached"
        )
    if count < n_tokens:
        log.warning("corpus ran out after %d of %d tokens; statistics use what there was", count, n_tokens)
    result = {}
    for layer, p in zip(layers, partials):
        mom2 = (sums[layer] / count).to(torch.float32)
        if not bool(torch.isfinite(mom2).all()):
            raise LokaError(
                f"statistics for layer {layer} are not finite: the model's activations overflow; nothing was cached"
            )
        f, meta_f, _ = _paths(handle, layer, fp, n_tokens)
        f.parent.mkdir(parents=True, exist_ok=True)
        _save_tensor_file(f, {"mom2": mom2})
        atomic_write_json(
            meta_f,
            {
                "model_hash": handle.model_hash,
                "module": handle.spec.mlp_out_path(layer),
                "corpus": fp,
                "n_tokens": n_tokens,
                "count": count,
                "sha256": sha256_file(f),  # of the file (the header's content_sha256 is what loads check)
                "seconds": round(time.time() - t0, 2),
            },
        )
        p.unlink(missing_ok=True)
        result[layer] = mom2
    # the progress stage reports the same line; this one is for debug logs
    log.debug("statistics for layers %s: %d tokens in %.1fs", layers, count, time.time() - t0)
    return result


def verify(path: Path) -> None:
    """Raise :class:`CacheError` when a statistics file is not whole or does not match its hash."""
    if _read_verified(Path(path)) is None:
        raise CacheError(f"{path} does not match its recorded hash; delete it to recompute")
