"""The evaluation runner behind ``loka eval``: single / batch / sequential editing, resumable.

Layout of ``out_dir``: ``pre.jsonl`` (unedited scores per case, computed once), ``results.jsonl``
(one line per case: metrics before/after), ``sequential.jsonl`` (one line per checkpoint),
``artifacts/`` (sequential mode: one artifact per batch, so a resumed run re-applies them),
``summary.json`` and, for sequential runs, ``sequential.png``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import env
from ..api import edit
from ..errors import ConfigError, LokaError, OutputError, RequestError
from ..methods import REGISTRY as METHODS
from ..methods import default_hparams, get_method
from ..sequential import BatchFolder
from ..state import EditState
from ..utils.io import atomic_write_bytes, atomic_write_json, check_writable, hash_json, read_json
from ..utils.progress import bar as progress_bar
from .data import EvalCase
from .guard import general_guard
from .metrics import TABLE, case_metrics, generation_scores, harmonic_mean, score_cases, wild_generations

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    method: str = "rome"
    mode: str = "single"  # single | batch | sequential
    batch_size: int | None = None  # None: every case in one batch (batch mode), one per batch (sequential)
    hparams: dict = field(default_factory=dict)
    generation: bool = False  # greedy-generation metrics (slower)
    wild: bool = False  # WILD: answers by generation to the question, paraphrases and neighbours (slower)
    guard: bool = True  # perplexity + multiple choice before and after
    checkpoints: tuple[int, ...] = (10, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10000)
    prune: float | None = None  # PRUNE log base applied after each edit (None: off)
    # sequential: score a seeded random sample of this many of the facts edited so far at each checkpoint
    # (None: all of them). An estimate, for methods whose scoring is slow (SCR runs a relevance check per fact)
    score_sample: int | None = None
    # sequential: stop after the batch that passes this many seconds of this invocation, with a final
    # checkpoint there (a method too slow for the whole stream ends where it is; --resume goes on)
    max_seconds: float | None = None

    def __post_init__(self):
        if self.mode not in ("single", "batch", "sequential"):
            raise ConfigError(f"mode (--mode) must be single, batch or sequential, got {self.mode!r}")
        if self.mode == "single":
            self.batch_size = 1
        if self.score_sample is not None and (self.mode != "sequential" or self.score_sample < 1):
            raise ConfigError(
                f"score_sample (--score-sample) must be a positive number of cases and needs mode "
                f"'sequential'; got {self.score_sample!r} with mode {self.mode!r}"
            )


def _append(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: ignore it
                log.warning("ignoring a truncated line in %s", path)
    return out


SCORE_GROUP = 4  # records per packed scoring call (larger matmuls; see benchmarks/eval_throughput.py)


def _scores_many(handle: ModelHandle, cases: list[EvalCase], cfg: EvalConfig) -> list[dict]:
    out = []
    for i in range(0, len(cases), SCORE_GROUP):
        group = cases[i : i + SCORE_GROUP]
        wild = wild_generations(handle, group) if cfg.wild else [None] * len(group)
        for c, s, w in zip(group, score_cases(handle, group), wild):
            if cfg.generation or c.multihop:
                s["_gen"] = generation_scores(handle, c)
            if w is not None:
                s["_wild"] = {"target": c.target_new, **w}
            out.append(s)
    return out


def probe_detail(handle: ModelHandle, scores: dict) -> dict:
    """What the model does on a case's edit prompt: its top next token, P(new) and P(true) (the
    product of the target's token probabilities, teacher-forced) and, when recorded, its generation."""
    rw = scores.get("rewrite", {})
    out: dict = {}
    if rw.get("new"):
        sc = rw["new"][0]
        out["top"] = handle.tokenizer.decode([sc["argmax_ids"][0]])
        out["p_new"] = float(np.exp(np.sum(sc["token_logprobs"])))
    if rw.get("true"):
        out["p_true"] = float(np.exp(np.sum(rw["true"][0]["token_logprobs"])))
    if scores.get("_gen", {}).get("text") is not None:
        out["generation"] = scores["_gen"]["text"]
    if scores.get("_wild"):  # the generated answers the WILD metrics matched
        out["wild"] = {k: v for k, v in scores["_wild"].items() if k != "target"}
    return out


def case_row(handle: ModelHandle, case: EvalCase, post: dict, pre: dict) -> dict:
    """One line of ``results.jsonl``: the case's edit prompt and targets, its metrics before and after,
    and what the model answered before and after (:func:`probe_detail`)."""
    return {
        "case_id": str(case.case_id),
        "prompt": case.rewrite[0] if case.rewrite else None,
        "target_new": case.target_new,
        "target_true": case.target_true,
        "pre": case_metrics(pre, pre),
        "post": case_metrics(post, pre),
        "before": probe_detail(handle, pre),
        "after": probe_detail(handle, post),
    }


def summarise(rows: list[dict], key: str = "post") -> dict:
    out = {}
    for name in TABLE:
        vals = [r[key][name] for r in rows if r.get(key, {}).get(name) is not None]
        if vals:
            out[name] = float(np.mean(vals))
    if all(k in out for k in ("ES", "PS", "NS")):
        out["S"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    out["n"] = sum(1 for r in rows if key in r)
    errors = sum(1 for r in rows if "error" in r)
    if errors:
        out["skipped"] = errors
    return out


def is_eval_run(folder: Path) -> bool:
    """Whether ``folder`` holds an evaluation run loka wrote (its ``config.json``)."""
    try:
        cfg = read_json(Path(folder) / "config.json", 1 << 22)
    except LokaError:
        return False
    return isinstance(cfg, dict) and {"method", "mode"} <= set(cfg)


def _setting(v: object) -> str:
    return "not set" if v is None else repr(v)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs (nested dicts key by key)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {_setting(a)} in the folder, {_setting(b)} now")
    return out


def check_run_folder(out: str | Path, resume: bool = False, force: bool = False) -> Path:
    """Before any work: may a run be written to ``out``? A new or empty folder may; an earlier run only
    with ``resume`` (continue it) or ``force`` (replace it); a folder loka did not write never."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; an evaluation run is a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not is_eval_run(out):
            raise OutputError(
                f"{out} is a folder loka did not write as an evaluation run; loka never writes into it: choose "
                "another --out"
            )
        if not (resume or force):
            raise OutputError(
                f"{out} holds an earlier run: pass --resume to continue it or --force to replace it"
            )
    check_writable(out.parent if str(out.parent) else Path("."))
    return out


def run_eval(
    handle: ModelHandle,
    cases: list[EvalCase],
    cfg: EvalConfig,
    out_dir: str | Path,
    resume: bool = False,
    force: bool = False,
) -> dict:
    """Run (or with ``resume`` continue) an evaluation into ``out_dir`` (:func:`check_run_folder`)."""
    out = check_run_folder(out_dir, resume, force)
    if cfg.batch_size is None:
        cfg.batch_size = len(cases) if cfg.mode == "batch" else 1
    elif cfg.batch_size < 1:
        raise ConfigError(
            f"batch_size (--batch-size) must be a positive number of cases, got {cfg.batch_size}"
        )
    meta = {  # resolving the hyperparameters validates them: a refused run leaves no folder behind
        "model": handle.name,
        "model_hash": handle.model_hash,
        "method": cfg.method,
        "mode": cfg.mode,
        "batch_size": cfg.batch_size,
        "hparams": cfg.hparams,
        # what the method runs with (its model config, then the overrides): a changed default shows here
        **(
            {"resolved_hparams": default_hparams(cfg.method, handle, cfg.hparams).to_dict()}
            if cfg.method in METHODS
            else {}
        ),
        "n_cases": len(cases),
        "generation": cfg.generation,
        **({"wild": True} if cfg.wild else {}),
        **({"prune": cfg.prune} if cfg.prune is not None else {}),
        **({"score_sample": cfg.score_sample} if cfg.score_sample is not None else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "config.json"
    if resume and cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        # every key of either run (an option only one of them set counts too); a resumed run may extend to more cases
        same = (set(meta) | set(old)) - {"n_cases"}
        if "resolved_hparams" not in old:  # a folder without them is compared on the given hparams alone
            same.discard("resolved_hparams")
        diff = _differences({k: old.get(k) for k in same}, {k: meta.get(k) for k in same})
        if diff:
            raise ConfigError(
                f"{out} holds a run with other settings ({'; '.join(diff)}); use another --out or drop --resume"
            )
    elif not resume:
        for f in (
            "pre.jsonl",
            "results.jsonl",
            "sequential.jsonl",
            "edits.jsonl",
            "summary.json",
            "batches.json",
        ):
            (out / f).unlink(missing_ok=True)
        for d in ("artifacts", "state"):  # a fresh sequential run must not re-apply an old run's edits
            shutil.rmtree(out / d, ignore_errors=True)
    atomic_write_json(cfg_file, meta)

    # 1. unedited scores, once (a sampled sequential run scores only the cases its checkpoints draw,
    # when they draw them)
    pre = {r["case_id"]: r["scores"] for r in _read_jsonl(out / "pre.jsonl")}
    if not (cfg.mode == "sequential" and cfg.score_sample is not None):
        fill_unedited(handle, cases, cfg, out, pre)
    summary: dict = {"config": meta}
    if cfg.guard:
        gfile = out / "guard_pre.json"
        shared_guard = env.cache_dir("eval") / f"guard-{handle.model_hash[:16]}.json"
        src = gfile if gfile.exists() else shared_guard if shared_guard.exists() else None
        summary["guard_pre"] = json.loads(src.read_text()) if src else general_guard(handle)
        atomic_write_json(gfile, summary["guard_pre"])
        atomic_write_json(shared_guard, summary["guard_pre"])

    res_file = out / "results.jsonl"
    done = {r["case_id"] for r in _read_jsonl(res_file)}
    t0 = time.time()
    if cfg.method == "none":
        for c in cases:
            if str(c.case_id) not in done:
                p = pre[str(c.case_id)]
                _append(res_file, case_row(handle, c, p, p))
    elif cfg.mode in ("single", "batch"):
        todo = [c for c in cases if str(c.case_id) not in done]
        bar = progress_bar(total=len(todo), desc=f"{cfg.method} {cfg.mode}", unit="case")
        for i in range(0, len(todo), cfg.batch_size):
            chunk = todo[i : i + cfg.batch_size]
            reqs = [r for c in chunk for r in c.requests]
            t = time.time()
            try:
                art = edit(handle, reqs, cfg.method, cfg.hparams, progress=False, prune=cfg.prune)
            except RequestError as e:  # a malformed case is recorded and skipped, the run goes on
                log.warning("skipping case(s) %s: %s", [c.case_id for c in chunk], e)
                for c in chunk:
                    _append(res_file, {"case_id": str(c.case_id), "error": str(e)})
                bar.update(len(chunk))
                continue
            sec = time.time() - t
            _append(
                out / "edits.jsonl",
                {
                    "case_ids": [str(c.case_id) for c in chunk],
                    "seconds": round(sec, 2),
                    "timings": {
                        k: round(v, 2) for k, v in art.manifest.get("extra", {}).get("timings", {}).items()
                    },
                },
            )
            try:
                for c, post in zip(chunk, _scores_many(handle, chunk, cfg)):
                    row = case_row(handle, c, post, pre[str(c.case_id)])
                    _append(res_file, {**row, "edit_seconds": sec / len(chunk)})
            finally:
                art.revert(handle)
            bar.update(len(chunk))
        bar.close()
    else:
        summary["sequential"] = _run_sequential(handle, cases, cfg, out, pre)
    rows = _read_jsonl(res_file)
    summary.update(
        {
            "pre": summarise(rows, "pre"),
            "post": summarise(rows, "post"),
            "seconds": round(time.time() - t0, 1),
        }
    )
    edits = _read_jsonl(out / "edits.jsonl")  # the method alone, without scoring, split by phase
    if edits:
        summary["edit_seconds"] = round(sum(e.get("seconds", 0.0) for e in edits), 1)
    if cfg.guard:
        if cfg.mode == "sequential" and summary.get("sequential"):
            summary["guard_post"] = summary["sequential"][-1].get("guard")
        else:  # single/batch runs revert every edit: no edited model remains to guard
            summary.pop("guard_post", None)
            summary["guard_note"] = f"guard measured on the unedited model ({cfg.mode} runs revert each edit)"
    atomic_write_json(out / "summary.json", summary)
    return summary


def _clock() -> float:
    """Seconds for the time budget (its own name, so a test can move the clock)."""
    return time.time()


def fill_unedited(handle: ModelHandle, cases: list[EvalCase], cfg: EvalConfig, out: Path, pre: dict) -> None:
    """Add to ``pre`` (and ``pre.jsonl``) the unedited scores of the ``cases`` it lacks, from the cache
    shared across runs (keyed by the model's hash and the case's content) or computed on ``handle``,
    which must be the unedited model."""
    todo = [c for c in cases if str(c.case_id) not in pre]
    if not todo:
        return
    shared_file = (
        env.cache_dir("eval")
        / f"pre-{handle.model_hash[:16]}-{int(cfg.generation)}{'-wild' if cfg.wild else ''}.jsonl"
    )
    shared = {r["key"]: r["scores"] for r in _read_jsonl(shared_file)}
    keys = {str(c.case_id): hash_json([repr(c), cfg.generation, cfg.wild]) for c in todo}
    missing = [c for c in todo if keys[str(c.case_id)] not in shared]
    bar = progress_bar(total=len(missing), desc="unedited scores", unit="case", disable=not missing)
    for i in range(0, len(missing), SCORE_GROUP):
        group = missing[i : i + SCORE_GROUP]
        for c, s in zip(group, _scores_many(handle, group, cfg)):
            shared[keys[str(c.case_id)]] = s
            _append(shared_file, {"key": keys[str(c.case_id)], "scores": s})
        bar.update(len(group))
    bar.close()
    for c in todo:
        pre[str(c.case_id)] = shared[keys[str(c.case_id)]]
        _append(out / "pre.jsonl", {"case_id": str(c.case_id), "scores": pre[str(c.case_id)]})


def _run_sequential(handle: ModelHandle, cases, cfg, out: Path, pre: dict) -> list[dict]:
    art_dir = BatchFolder(
        out / "artifacts", index=out / "batches.json"
    )  # resume: the batches already edited, re-applied below
    seq_file = out / "sequential.jsonl"
    batches = [cases[i : i + cfg.batch_size] for i in range(0, len(cases), cfg.batch_size)]
    saved = len(art_dir)
    if saved > len(batches):
        raise LokaError(
            f"{art_dir.folder} holds {saved} batches but this run has {len(batches)}; use another --out"
        )
    state_dir = out / "state"
    state = EditState.load(state_dir) if state_dir.exists() else EditState()
    needs_state = cfg.prune is not None or (cfg.method in METHODS and get_method(cfg.method).stateful)
    if needs_state and state.batches == saved + 1:  # the state of a batch whose artifact was never recorded
        state.truncate(saved)
    if needs_state and state.batches != saved:
        raise LokaError(
            f"{out}: the saved edit state covers {state.batches} batch(es) but {saved} batch(es) are recorded "
            f"(the state was replaced or edited by hand); to resume from batch {state.batches}, delete "
            f"{art_dir.path(state.batches)} and every later batch (BatchFolder.keep_first({state.batches}) does it), "
            "or start again in a new --out"
        )
    applied = []
    for k in range(saved):
        a = art_dir.load(k)
        a.apply(handle)
        applied.append(a)
    checkpoints = sorted({c for c in cfg.checkpoints if c < len(cases)} | {len(cases)})
    done_ckpt = {r["n_edits"] for r in _read_jsonl(seq_file)}
    n_edits = sum(len(b) for b in batches[: len(applied)])
    bar = progress_bar(total=len(cases), initial=n_edits, desc=f"{cfg.method} sequential", unit="case")
    try:
        deadline = _clock() + cfg.max_seconds if cfg.max_seconds else None
        for k in range(len(applied), len(batches)):
            reqs = [r for c in batches[k] for r in c.requests]
            t_edit = time.time()
            a = edit(handle, reqs, cfg.method, cfg.hparams, progress=False, state=state, prune=cfg.prune)
            t_edit = time.time() - t_edit
            art_dir.append(a, before_index=lambda: state.save(state_dir))
            applied.append(a)
            _append(
                out / "edits.jsonl",
                {"case_ids": [str(c.case_id) for c in batches[k]], "seconds": round(t_edit, 2)},
            )
            n_edits += len(batches[k])
            bar.update(len(batches[k]))
            hit = [c for c in checkpoints if n_edits >= c and c not in done_ckpt]
            out_of_time = deadline is not None and _clock() > deadline and k + 1 < len(batches)
            if out_of_time and not hit and n_edits not in done_ckpt:
                hit = [n_edits]  # the last state is scored before stopping
            if hit:
                edited = checkpoint_cases([c for b in batches[: k + 1] for c in b], cfg.score_sample, n_edits)
                if any(str(c.case_id) not in pre for c in edited):  # unedited scores of a new sample:
                    for x in reversed(applied):  # measured on the unedited model, then the edits go back
                        x.revert(handle)
                    try:
                        fill_unedited(handle, edited, cfg, out, pre)
                    finally:
                        for x in applied:
                            x.apply(handle)
                rows = []
                for c, post in zip(edited, _scores_many(handle, edited, cfg)):
                    rows.append(case_row(handle, c, post, pre[str(c.case_id)]))
                # the same cases before any edit, so a sampled checkpoint has its own paired baseline
                unedited = {k: v for k, v in summarise(rows, "pre").items() if k != "skipped"}
                row = {
                    "n_edits": n_edits,
                    **summarise(rows, "post"),
                    "pre": unedited,
                    "last_batch_edit_s": round(t_edit, 1),
                    "last_batch_timings": {
                        k: round(v, 1) for k, v in a.manifest.get("extra", {}).get("timings", {}).items()
                    },
                }
                if cfg.guard:
                    row["guard"] = general_guard(handle)
                _append(seq_file, row)
                done_ckpt.update(hit)
                # a checkpoint that ran past the budget is the last one: no edit follows it unscored
                out_of_time = out_of_time or (
                    deadline is not None and _clock() > deadline and k + 1 < len(batches)
                )
                if n_edits == len(cases) or out_of_time:  # the per-case rows of the model as it ends
                    atomic_write_bytes(
                        out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()
                    )
            if out_of_time:
                log.warning(
                    "%s: stopped after %d of %d edits: max_seconds %.0f passed (resuming the run goes on from there)",
                    cfg.method,
                    n_edits,
                    len(cases),
                    cfg.max_seconds,
                )
                break
    finally:
        bar.close()
        for a in reversed(applied):
            a.revert(handle)
    seq = _read_jsonl(seq_file)
    if seq:
        plot_sequential(seq, out / "sequential.png", f"{handle.name} · {cfg.method} · batch {cfg.batch_size}")
    return seq


def checkpoint_cases(edited: list, sample: int | None, n_edits: int) -> list:
    """The cases a checkpoint scores: every edited case, or a random sample of ``sample`` of them seeded
    by the checkpoint (so a resumed run scores the same ones), in edit order."""
    if sample is None or len(edited) <= sample:
        return edited
    return [edited[i] for i in sorted(random.Random(n_edits).sample(range(len(edited)), sample))]


def plot_sequential(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        m
        for m in ("ES", "PS", "NS", "reliability", "generalization", "locality")
        if any(m in r for r in rows)
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["n_edits"] for r in rows]
    for m in names:
        ax.plot(xs, [r.get(m) for r in rows], marker="o", label=m)
    ax.set_xlabel("number of edits")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    if any("guard" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(xs, [r["guard"]["ppl"] for r in rows], "k--", label="perplexity")
        ax2.set_ylabel("held-out perplexity (log)")
        ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(summary: dict) -> str:
    cols = [c for c in ["S", *TABLE] if c in summary["post"]]
    lines = [" ".join(f"{c:>8s}" for c in ["", *cols])]
    for key in ("pre", "post"):
        lines.append(" ".join([f"{key:>8s}"] + [f"{summary[key].get(c, float('nan')):8.3f}" for c in cols]))
    for g in ("guard_pre", "guard_post"):
        if summary.get(g):
            lines.append(f"{g}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary[g].items()))
    if summary.get("guard_note"):
        lines.append(summary["guard_note"])
    return "\n".join(lines)


def evaluate(
    handle: ModelHandle,
    cases: str | Path | list[EvalCase],
    method: str = "rome",
    mode: str = "single",
    *,
    hparams: dict | None = None,
    batch_size: int | None = None,
    n: int | None = None,
    out: str | Path | None = None,
    generation: bool = False,
    wild: bool = False,
    guard: bool = True,
    resume: bool = False,
    force: bool = False,
) -> dict:
    """Edit benchmark cases and measure the edits: what ``loka eval`` does, returning its summary
    (``summary.json``). ``cases`` is a CounterFact / zsRE / MQuAKE / loka file or a list of
    :class:`EvalCase`; ``out`` keeps the run folder (default: a temporary one, removed afterwards)."""
    import tempfile

    from .data import load_cases

    if not isinstance(cases, list):
        cases = load_cases(cases, n=n)
    elif n is not None:
        cases = cases[:n]
    cfg = EvalConfig(
        method=method,
        mode=mode,
        batch_size=batch_size,
        hparams=dict(hparams or {}),
        generation=generation,
        wild=wild,
        guard=guard,
    )
    if out is not None:
        return run_eval(handle, cases, cfg, out, resume=resume, force=force)
    with tempfile.TemporaryDirectory(prefix="loka-eval-") as tmp:
        return run_eval(handle, cases, cfg, Path(tmp) / "run")
