"""Cached model load time, each repeat in a fresh process (what a ``loka`` command pays).

    python benchmarks/load_time.py --repeats 5

Per model and tokenizer backend it reports ``load_model`` wall time after ``import loka``, split into
transformers importing its modelling stack (once per process, paid by every model alike) and the rest
(config, weights, tokenizer), plus the tokenizer alone. ``--backends`` compares loka's default tokenizer
path (SentencePiece for Gemma 3) with ``LOKA_TOKENIZER=tokenizers``. Prints a table and writes
``benchmarks/results/load_time.json``; its provenance gives the intra-op threads the child processes
resolve (``LOKA_THREADS``, else the idle CPUs when the run starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import stamp, write_result

from loka.env import requested_threads

CHILD = r"""
import json, sys, time
import loka
from loka.models import loader
t0 = time.perf_counter()
import transformers.modeling_utils  # noqa: F401  (the modelling stack every from_pretrained imports)
t1 = time.perf_counter()
orig = loader._fast_tokenizer
tok_s = []
def timed(folder):
    s = time.perf_counter(); tok = orig(folder); tok_s.append(time.perf_counter() - s); return tok
loader._fast_tokenizer = timed
h = loka.load_model(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import_modelling_s": t1 - t0, "rest_s": t2 - t1, "load_model_s": t2 - t0,
                  "tokenizer_s": tok_s[0] if tok_s else None, "tokenizer": type(h.tokenizer).__name__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", nargs="+", default=["auto", "tokenizers"], choices=["auto", "tokenizers"])
    ap.add_argument("--out", default="benchmarks/results/load_time.json")
    args = ap.parse_args()
    started = stamp(threads=requested_threads())
    rows = []
    for model in args.models:
        for backend in args.backends:
            env = {**os.environ, "LOKA_TOKENIZER": backend}
            # one warm-up run, so that a first conversion or tokenizer check is not timed
            subprocess.run([sys.executable, "-c", CHILD, model], env=env, check=True, capture_output=True)
            runs = []
            for _ in range(args.repeats):
                out = (
                    subprocess.run(
                        [sys.executable, "-c", CHILD, model],
                        env=env,
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                runs.append(json.loads(out))
            med = {
                k: statistics.median(r[k] for r in runs)
                for k in ("load_model_s", "import_modelling_s", "rest_s", "tokenizer_s")
            }
            rows.append(
                {
                    "model": model,
                    "backend": backend,
                    "tokenizer": runs[0]["tokenizer"],
                    "median": med,
                    "min_load_model_s": min(r["load_model_s"] for r in runs),
                    "max_load_model_s": max(r["load_model_s"] for r in runs),
                    "runs": runs,
                }
            )
    print(
        f"| model | tokenizer | load_model median (min–max) | of which transformers' modelling import | "
        f"rest | tokenizer alone |  ({args.repeats} fresh processes each)"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        m = r["median"]
        print(
            f"| {r['model']} | {r['tokenizer']} | {m['load_model_s']:.2f} s ({r['min_load_model_s']:.2f}–"
            f"{r['max_load_model_s']:.2f}) | {m['import_modelling_s']:.2f} s | {m['rest_s']:.2f} s | "
            f"{m['tokenizer_s']:.2f} s |"
        )
    write_result(args.out, {"threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}, provenance=started)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
