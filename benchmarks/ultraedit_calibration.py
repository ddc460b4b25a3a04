"""UltraEdit on one model: ES/PS/NS of one batch of edits for each (layers, lr) setting.

    python benchmarks/ultraedit_calibration.py --model smollm2-135m --n 100 \
        --layers 26,27,28 --lr 1e-6 1e-5 1e-4

Each setting edits the same ``--n`` records of ``data/generated/cf_all_300.json`` in one batch (one
UltraEdit turn, fresh statistics), scores them (teacher-forced ES/PS/NS) and reverts. The pseudo-values
scale with ``‖k̂‖² ≈ d_in``, so the reference's η (1e-6 for 14,336-wide inputs) is swept per model.
Rows are stamped one by one and merged into the JSON (``--out``), so settings can be added later.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import merge_rows, stamp, write_result

import loka
from loka.eval.data import load_cases
from loka.eval.runner import EvalConfig, run_eval

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(ROOT / "data/generated/cf_all_300.json"))
    ap.add_argument("--n", type=int, default=100, help="records edited in the one batch")
    ap.add_argument("--layers", nargs="+", default=["26,27,28"], help="comma-separated layer sets")
    ap.add_argument("--lr", nargs="+", type=float, default=[1e-6, 1e-5, 1e-4], help="η values")
    ap.add_argument(
        "--out", default=None, help="JSON (default benchmarks/results/ultraedit_calibration_MODEL.json)"
    )
    args = ap.parse_args()
    handle = loka.load_model(args.model)
    prov = stamp()
    cases = load_cases(args.data, args.n)
    out = Path(args.out or ROOT / f"benchmarks/results/ultraedit_calibration_{args.model}.json")
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = {}
    for layers in args.layers:
        ls = [int(x) for x in layers.split(",")]
        for lr in args.lr:
            cfg = EvalConfig(
                method="ultraedit",
                mode="batch",
                batch_size=args.n,
                hparams={"layers": ls, "lr": lr},
                guard=False,
            )
            t = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                s = run_eval(handle, cases, cfg, Path(tmp) / "run")
            key = f"layers {layers} lr {lr:g}"
            rows[key] = {
                "layers": ls,
                "lr": lr,
                **{k: round(s["post"][k], 4) for k in ("ES", "PS", "NS", "S") if k in s["post"]},
                "unedited": {k: round(s["pre"][k], 4) for k in ("ES", "PS", "NS", "S") if k in s["pre"]},
                "edit_seconds": s.get("edit_seconds"),
                "seconds": round(time.time() - t, 1),
            }
            print(key, json.dumps(rows[key]), flush=True)
    payload = {
        "model": args.model,
        "data": str(Path(args.data).relative_to(ROOT)) if Path(args.data).is_relative_to(ROOT) else args.data,
        "n": args.n,
        "rows": merge_rows(old.get("rows") if old.get("n") == args.n else None, rows, prov),
    }
    write_result(out, payload, provenance=prov)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
