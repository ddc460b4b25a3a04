"""A batch of 100 MEMIT / AlphaEdit edits on SmolLM2: time per phase and edit quality, before and
after each optimisation of the batched value search. Prints a table and writes JSON.

    python benchmarks/batch_edit_speed.py [--rows before,suffix,tree,v_lr2,trees,beta,default,alphaedit-ref,alphaedit]

Each row edits records 0-99 of ``data/generated/cf_all_300.json`` in one batch through the
evaluation runner (``loka eval --mode batch --batch-size 100``), so the same ES/PS/NS come with the
time; the time is the method's alone (``edits.jsonl``), not the scoring. Rows of earlier runs in
``--out`` are kept; each row carries the provenance of the run that measured it. Rows, cumulative
(each pins the settings it measures, so a change of the defaults does not change a row):

* ``before`` — the search without these optimisations: a row group per context template, chunks
  of 16 requests, ``v_lr`` 0.5, padded key rows in the update phase, Adam's β₁ 0.9, float32;
* ``suffix`` — requests bucketed by suffix length in one chunk (``v_grouping="suffix"``);
* ``tree`` — the update phase's key forwards as token trees (``key_tree``);
* ``v_lr2`` — ``v_lr`` 2.0, the SmolLM2 config (all targets converge, fewer steps);
* ``trees`` — the search's reference forward runs shared prefixes once, as token trees
  (``v_prefix_tree``; the rows above pad them), and grouped-query attention takes the key/value heads
  without copying them per group (the rows above run with ``TRANSFORMERS_SDPA_FORCE_GQA=0``, which
  turns that off). Every row's reference forward stops at the first replayed block.
* ``beta`` — Adam's β₁ 0.5 in the search (``v_beta1``; the reference's is 0.9);
* ``default`` — the search's matmuls in bfloat16 as well (``v_dtype``): MEMIT's SmolLM2 defaults;
* ``alphaedit-ref`` — AlphaEdit with the reference's search (``v_lr`` 0.5, β₁ 0.9, float32);
* ``alphaedit`` — AlphaEdit with its defaults;
* ``ultraedit`` — UltraEdit with its defaults (one turn: no value search, no statistics);
* ``grace`` — GRACE with its defaults (the batch's codebook values trained together; no keys or
  update phase).

Target: <= 60 s for a batch of 100 (2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import merge_rows, stamp, write_result

import loka
from loka.eval.data import load_cases
from loka.eval.runner import EvalConfig, run_eval

_PADDED = {"v_prefix_tree": False}  # the reference forward's prefixes as padded rows
_NO_GQA = {"TRANSFORMERS_SDPA_FORCE_GQA": "0"}  # key/value heads repeated per query group
_REF_ADAM = {"v_beta1": 0.9, "v_dtype": "float32"}  # the reference's Adam momentum, float32
ROWS = {  # name: (method, hparams, environment)
    "before": (
        "memit",
        {
            "v_grouping": "template",
            "v_batch_size": 16,
            "v_lr": 0.5,
            "key_tree": False,
            **_PADDED,
            **_REF_ADAM,
        },
        _NO_GQA,
    ),
    "suffix": ("memit", {"v_lr": 0.5, "key_tree": False, **_PADDED, **_REF_ADAM}, _NO_GQA),
    "tree": ("memit", {"v_lr": 0.5, **_PADDED, **_REF_ADAM}, _NO_GQA),
    "v_lr2": ("memit", {**_PADDED, **_REF_ADAM}, _NO_GQA),
    "trees": ("memit", _REF_ADAM, {}),
    "beta": ("memit", {"v_dtype": "float32"}, {}),
    "default": ("memit", {}, {}),
    "alphaedit-ref": ("alphaedit", {"v_lr": 0.5, **_REF_ADAM}, {}),
    "alphaedit": ("alphaedit", {}, {}),
    "ultraedit": ("ultraedit", {}, {}),
    "grace": ("grace", {}, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/generated/cf_all_300.json")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default="benchmarks/results/batch_edit_speed_smollm2-135m.json")
    args = ap.parse_args()
    handle = loka.load_model(args.model)
    started = stamp()
    cases = load_cases(args.data, args.n)
    out = Path(args.out)
    results = json.loads(out.read_text())["rows"] if out.exists() else {}
    work = Path(tempfile.mkdtemp(prefix="batch_edit_speed_"))
    for name in args.rows.split(","):
        method, hp, env = ROWS[name]
        folder = work / name
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            s = run_eval(
                handle,
                cases,
                EvalConfig(method=method, mode="batch", batch_size=args.n, hparams=hp, guard=False),
                folder,
            )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        edit = json.loads((folder / "edits.jsonl").read_text().splitlines()[0])
        row = {
            "method": method,
            "hparams": hp,
            **({"env": env} if env else {}),
            "seconds": edit["seconds"],
            "timings": edit["timings"],
            **{k: round(s["post"][k], 3) for k in ("ES", "PS", "NS", "reliability")},
        }
        results = merge_rows(results, {name: row}, started)
        write_result(
            out,
            {"model": args.model, "records": args.n, "target_s": 60, "rows": results},
            provenance=started,
        )
        print(f"{name}: {edit['seconds']:.1f} s {edit['timings']}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{'row':10s} {'method':9s} {'total s':>8s} {'keys':>6s} {'values':>7s} {'update':>7s} "
        f"{'ES':>6s} {'PS':>6s} {'NS':>6s}"
    )
    for name, r in results.items():
        t = r["timings"]
        print(
            f"{name:10s} {r['method']:9s} {r['seconds']:8.1f} {t.get('keys', 0):6.1f} {t.get('values', 0):7.1f} "
            f"{t.get('update', 0):7.1f} {r['ES']:6.3f} {r['PS']:6.3f} {r['NS']:6.3f}"
        )


if __name__ == "__main__":
    main()
