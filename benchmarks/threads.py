"""A ROME edit on SmolLM2 on a quiet and on a busy machine, with the old and the new thread default.

    python benchmarks/threads.py --rounds 3

"Busy": a second CPU-bound process (a pure-Python loop) runs beside the edit. "old default": torch's
own intra-op thread count (one per core, what loka used before it set threads itself); "new
default": ``LOKA_THREADS=auto`` (the CPUs no other process keeps busy, :func:`loka.env.auto_threads`).
Each measurement is a fresh process that loads the model, makes one warm-up edit (statistics cached)
and times a second one; the four cases alternate round by round. Prints medians and ratios, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import write_result

EDIT = r"""
import json, time, torch, loka
h = loka.load_model("{model}")
loka.edit(h, loka.EditRequest("{{}} is located in the city of", "The Eiffel Tower", "Rome"), "rome", progress=False, apply=False)
t0 = time.perf_counter()
loka.edit(h, loka.EditRequest("{{}} plays the", "Miles Davis", "piano"), "rome", progress=False, apply=False)
print(json.dumps({{"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}}))
"""
HOG = "import time\nt = time.time()\nwhile time.time() - t < 900:\n    pass\n"


def torch_default_threads() -> int:
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def one_edit(model: str, threads: str) -> dict:
    env = {**os.environ, "LOKA_THREADS": threads}
    out = subprocess.run(
        [sys.executable, "-c", EDIT.format(model=model)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model to edit")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs the four cases once")
    ap.add_argument("--out", default="benchmarks/results/threads_smollm2-135m.json", help="result JSON")
    args = ap.parse_args()
    old = str(torch_default_threads())
    policies = {"old default": old, "new default": "auto"}
    one_edit(args.model, "1")  # statistics and the model conversion are cached before timing
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for load in ("quiet", "busy"):
            hog = subprocess.Popen([sys.executable, "-c", HOG]) if load == "busy" else None
            try:
                if hog is not None:
                    time.sleep(1.0)  # the loop is running before the edit starts
                for name, threads in policies.items():
                    runs.setdefault((load, name), []).append(one_edit(args.model, threads))
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    rows = []
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    print(f"{'machine':7s} {'threads':12s} {'n':>3s} {'median s':>9s} {'vs quiet':>9s}")
    for (load, name), v in runs.items():
        ratio = med[(load, name)] / med[("quiet", name)]
        rows.append(
            {
                "machine": load,
                "policy": name,
                "threads_used": sorted({r["threads"] for r in v}),
                "median_s": round(med[(load, name)], 3),
                "ratio_to_quiet": round(ratio, 2),
                "runs_s": [round(r["seconds"], 3) for r in v],
            }
        )
        print(
            f"{load:7s} {name:12s} {len(v):3d} {med[(load, name)]:9.2f} {ratio:9.2f}  threads {rows[-1]['threads_used']}"
        )
    busy_gain = med[("busy", "old default")] / med[("busy", "new default")]
    quiet_cost = med[("quiet", "new default")] / med[("quiet", "old default")]
    print(
        f"busy machine: the new default is {busy_gain:.1f}x faster; quiet machine: new/old = {quiet_cost:.2f}"
    )
    path = write_result(
        args.out,
        {
            "model": args.model,
            "rounds": args.rounds,
            "old_default_threads": int(old),
            "rows": rows,
            "busy_old_over_new": round(busy_gain, 2),
            "quiet_new_over_old": round(quiet_cost, 2),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
