"""Edit speed on CPU: per-edit time split into statistics (cold vs cached), keys, value optimisation
and update, plus peak memory. Prints a table and writes JSON.

    python benchmarks/edit_speed.py --model smollm2-135m --rome-edits 5 --memit-edits 10

Targets (SmolLM2, 2 cores, statistics cached): ROME <= 1 s median per edit and <= 1.6 GB peak RSS; MEMIT 10 edits <= 30 s;
statistics for 5 layers from 100k tokens in one pass <= 5 min.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _facts import counterfactual_requests
from _stamp import stamp, write_result

import loka
from loka.cli.common import parse_overrides
from loka.resources import data_dir

DATA = data_dir()  # loka's package data


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timing_corpus(path: Path) -> Path:
    """Plain English from the bundled MQuAKE-hard, TOFU and known-facts files (>100k tokens), for timing."""
    texts = []
    for case in json.loads((DATA / "mquake" / "MQuAKE-hard.json").read_text()):
        texts.append(
            " ".join(case.get("questions", []))
            + " "
            + " ".join(f"{h.get('cloze', '')} {h.get('answer', '')}." for h in case.get("single_hops", []))
        )
        texts.append(
            " ".join(
                f"{h.get('question', '')} {h.get('answer', '')}." for h in case.get("new_single_hops", [])
            )
        )
    for name in ["retain_perturbed_subset_reconstructed.json", "forget10_reconstructed.json"]:
        texts += [f"{r['question']} {r['answer']}" for r in json.loads((DATA / "tofu" / name).read_text())]
    texts += [
        f["prompt"] + " " + f["attribute"] + "." for f in json.loads((DATA / "known_1000.json").read_text())
    ]
    texts = texts * 2  # repeated once so that the pass can reach 100k tokens: this corpus is for timing only
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rome-edits", type=int, default=5)
    ap.add_argument("--memit-edits", type=int, default=10)
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    ap.add_argument("--skip-cold-stats", action="store_true")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyperparameter override for both methods, e.g. v_dtype=bfloat16",
    )
    ap.add_argument("--out", default="benchmarks/results/edit_speed.json")
    args = ap.parse_args()
    res: dict = {"model": args.model, "threads": __import__("torch").get_num_threads()}
    t = time.time()
    handle = loka.load_model(args.model)
    res["load_s"] = round(time.time() - t, 2)
    started = stamp()
    over = parse_overrides(args.set)
    res["overrides"] = over
    rome_hp = loka.default_hparams("rome", handle, over)
    memit_hp = loka.default_hparams("memit", handle, over)
    rows = []

    if not args.skip_cold_stats:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = loka.corpus.JsonlCorpus(timing_corpus(Path(tmp) / "c.jsonl"))
            old = os.environ.get("LOKA_HOME")
            os.environ["LOKA_HOME"] = str(Path(tmp) / "home")  # cold: an empty cache
            try:
                t = time.time()
                layers = list(memit_hp.layers)[:5]
                loka.second_moments(handle, layers, corpus, args.stats_tokens)
                cold = time.time() - t
                t = time.time()
                loka.second_moments(handle, layers, corpus, args.stats_tokens)
                warm = time.time() - t
            finally:
                if old is None:
                    os.environ.pop("LOKA_HOME")
                else:
                    os.environ["LOKA_HOME"] = old
        rows.append(
            {
                "job": f"statistics, {len(layers)} layers, {args.stats_tokens} tok, one pass (cold)",
                "total_s": cold,
            }
        )
        rows.append({"job": "statistics, same, from cache", "total_s": warm})

    reqs = counterfactual_requests(max(args.rome_edits, args.memit_edits), seed=2)
    # warm the caches the methods use (statistics of the default corpus, templates)
    loka.edit(handle, reqs[0], "rome", rome_hp, progress=False).revert(handle)
    per = []
    for r in reqs[: args.rome_edits]:
        t = time.time()
        art = loka.edit(handle, r, "rome", rome_hp, progress=False)
        per.append((time.time() - t, art.manifest["extra"]["timings"]))
        art.revert(handle)
    med = statistics.median(p for p, _ in per)
    avg = {k: statistics.mean(tm[k] for _, tm in per) for k in per[0][1]}
    rows.append(
        {
            "job": f"ROME, median of {len(per)} single edits (layer {rome_hp.layer})",
            "total_s": med,
            **avg,
            "target": "<= 1 s",
            "peak_rss_mb": peak_mb(),
        }
    )

    loka.edit(handle, reqs[:1], "memit", memit_hp, progress=False).revert(
        handle
    )  # warm statistics for its layers
    t = time.time()
    art = loka.edit(handle, reqs[: args.memit_edits], "memit", memit_hp, progress=False)
    total = time.time() - t
    art.revert(handle)
    rows.append(
        {
            "job": f"MEMIT, {args.memit_edits} edits in one batch (layers {memit_hp.layers})",
            "total_s": total,
            **art.manifest["extra"]["timings"],
            "target": "<= 30 s",
            "peak_rss_mb": peak_mb(),
        }
    )

    cols = ["stats", "templates", "keys", "values", "update"]
    print(
        f"\n{'job':62s} {'total s':>8s} " + " ".join(f"{c:>9s}" for c in cols) + f" {'peak MB':>8s}  target"
    )
    for r in rows:
        print(
            f"{r['job']:62s} {r['total_s']:8.2f} "
            + " ".join(f"{r[c]:9.2f}" if c in r else f"{'':9s}" for c in cols)
            + (f" {r['peak_rss_mb']:8.0f}" if "peak_rss_mb" in r else f" {'':8s}")
            + f"  {r.get('target', '')}"
        )
    res["rows"] = rows
    write_result(args.out, res, provenance=started)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
