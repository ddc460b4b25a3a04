"""ROME's speed against its value-search settings, record by record: time per edit, its value search,
and ES/PS/NS of each setting on the same records.

    python benchmarks/rome_speed.py --model smollm2-135m --n 20

Settings alternate record by record (A, B, C, A, B, C, ...) so machine drift hits each alike; every
edit is scored (teacher-forced CounterFact ES/PS/NS) and reverted before the next. Reports the median
time, the median of per-record ratios to the first setting and the mean scores; writes a stamped JSON.
Statistics are cached before timing (one warm-up edit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import stamp, write_result

import loka
from loka.eval.data import load_cases
from loka.eval.metrics import case_metrics, score_cases

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "v_lr 0.5, β₁ 0.9 (reference)": {"v_lr": 0.5, "v_beta1": 0.9, "v_dtype": "float32"},
    "v_lr 0.5, β₁ 0.9, bfloat16 search": {"v_lr": 0.5, "v_beta1": 0.9, "v_dtype": "bfloat16"},
    "v_lr 2.0, β₁ 0.9, bfloat16 search": {"v_lr": 2.0, "v_beta1": 0.9, "v_dtype": "bfloat16"},
    "v_lr 1.0, β₁ 0.5": {"v_lr": 1.0, "v_beta1": 0.5, "v_dtype": "float32"},
    "v_lr 1.0, β₁ 0.5, bfloat16 search (SmolLM2 default)": {
        "v_lr": 1.0,
        "v_beta1": 0.5,
        "v_dtype": "bfloat16",
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(ROOT / "data/generated/cf_all_300.json"))
    ap.add_argument("--n", type=int, default=20, help="records (each edited once per setting)")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/rome_speed_MODEL.json)")
    args = ap.parse_args()
    handle = loka.load_model(args.model)
    prov = stamp()
    cases = load_cases(args.data, args.n)
    loka.edit(handle, cases[0].requests, "rome", progress=False).revert(handle)  # statistics cached
    pre = score_cases(handle, cases)
    rec: dict[str, dict[str, list]] = {
        k: {"s": [], "values": [], "steps": [], "norm": [], "ES": [], "PS": [], "NS": []} for k in SETTINGS
    }
    for i, (c, p) in enumerate(zip(cases, pre)):
        for name, hp in SETTINGS.items():
            t = time.perf_counter()
            art = loka.edit(handle, c.requests, "rome", hp, progress=False)
            dt = time.perf_counter() - t
            m = case_metrics(score_cases(handle, [c])[0], p)
            art.revert(handle)
            r = rec[name]
            r["s"].append(dt)
            r["values"].append(art.manifest["extra"].get("timings", {}).get("values"))
            r["steps"].append(art.manifest["extra"]["per_request"][0]["steps"])
            r["norm"].append(art.manifest["extra"]["per_request"][0]["delta_norm"])
            for k in ("ES", "PS", "NS"):
                r[k].append(m[k])
        print(f"record {i}: " + ", ".join(f"{k} {rec[k]['s'][-1]:.2f}s" for k in SETTINGS), flush=True)
    first = next(iter(SETTINGS))
    rows = {}
    for name, r in rec.items():
        rows[name] = {
            "hparams": SETTINGS[name],
            "median_s": round(statistics.median(r["s"]), 3),
            "median_values_s": round(statistics.median(v for v in r["values"] if v is not None), 3),
            "median_ratio_to_reference": round(
                statistics.median(a / b for a, b in zip(r["s"], rec[first]["s"])), 3
            ),
            "mean_steps": round(statistics.mean(r["steps"]), 2),
            "median_update_norm": round(statistics.median(r["norm"]), 2),  # ‖ΔW‖_F of the rank-one edit
            **{k: round(sum(r[k]) / len(r[k]), 4) for k in ("ES", "PS", "NS")},
            "seconds": [round(x, 3) for x in r["s"]],
        }
    out = Path(args.out or ROOT / f"benchmarks/results/rome_speed_{args.model}.json")
    write_result(
        out,
        {"model": args.model, "records": args.n, "data": Path(args.data).name, "rows": rows},
        provenance=prov,
    )
    print(
        f"\n{'setting':28s} {'median s':>9s} {'values s':>9s} {'ratio':>6s} {'ES':>6s} {'PS':>6s} {'NS':>6s}"
    )
    for name, r in rows.items():
        print(
            f"{name:28s} {r['median_s']:9.2f} {r['median_values_s']:9.2f} {r['median_ratio_to_reference']:6.2f} "
            f"{r['ES']:6.3f} {r['PS']:6.3f} {r['NS']:6.3f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
