"""Joint edit + forget on known facts (LOKA's in-profile and out-profile settings): every baseline and
LOKA with the six LOKA metrics.

    python benchmarks/joint_update.py --settings in out --n-edit 25 --n-forget 25 --n-retain 50
    python benchmarks/joint_update.py --settings in --methods loka --variant k=5 --set k=5   # ablations

Data: :func:`loka.bench.tasks.build_tasks` on ``data/generated/cf_smollm2.json`` (facts SmolLM2 gets
right). Rows (each on the unedited model, reverted afterwards):

* ``ft``: FT-L on one MLP matrix (edits by NLL, forgets by gradient ascent, one optimisation);
* ``ga`` / ``gd`` / ``npo``: the forget loss combined with FT edits (NLL on the new answers) and the
  retain term, one optimisation on layers 3–7; ``lora``: NPO + edits on LoRA factors;
* ``memit+npo`` / ``alphaedit+npo`` / ``grace+npo`` / ``wise+npo``: the editor first, then NPO forgets
  on the edited model with the same retain set (single-task editors);
* ``loka``: the codebook (defaults, or ``--set`` overrides under the row name ``--variant``).

Metrics (:func:`loka.forgetting.metrics.joint_metrics`): ``unl-tr`` (forget truth ratio, mean min(R, 1/R);
higher = closer to not knowing), ``unl-rl`` (ROUGE-L recall of the forgotten answer; lower is better),
``edt-rl`` / ``edt-prl`` (new answer on edit prompts / paraphrases), ``rem-tr`` / ``rem-rl`` (held-out
remaining facts; unedited values are the bar). LOKA rows add router firing rates. Writes
``benchmarks/results/joint_update_<model>.json`` after every row (rows of earlier runs are kept; each
row carries the provenance of the run that measured it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import merge_rows, stamp, write_result

import loka
from loka.bench.tasks import build_tasks
from loka.cli.common import parse_overrides
from loka.forgetting.metrics import joint_metrics
from loka.requests import ForgetRequest, RetainRequest, request_from_record

JOINT = {"ft": "ft", "ga": "ga", "gd": "gd", "npo": "npo", "lora": "lora", "loka": "loka"}
TWO_STEP = {"memit+npo": "memit", "alphaedit+npo": "alphaedit", "grace+npo": "grace", "wise+npo": "wise"}
METHODS = [*JOINT, *TWO_STEP]
KEYS = ["unl-tr", "unl-rl", "edt-rl", "edt-prl", "rem-tr", "rem-rl"]


def requests_of(task: dict):
    edits = [request_from_record(r, f"edit[{i}]") for i, r in enumerate(task["edit"])]
    forget = [
        ForgetRequest(
            f["prompt"],
            f["subject"],
            None,
            target_true=f["answer"],
            paraphrases=f["paraphrases"],
            relation_id=f["relation_id"],
            case_id=f["case_id"],
        )
        for f in task["forget"]
    ]
    retain = [
        RetainRequest(
            f["prompt"], f["subject"], f["answer"], relation_id=f["relation_id"], case_id=f["case_id"]
        )
        for f in task["retain"]
    ]
    return edits, forget, retain


def _query_sets(task: dict) -> dict:
    """The six query sets of a joint task: updated prompts, their paraphrases, retained and held-out facts."""
    fill = lambda f: f["prompt"].replace("{}", f["subject"])  # noqa: E731
    sets = {
        "edit": [fill(e["requested_rewrite"]) for e in task["edit"]],
        "edit_para": [p for e in task["edit"] for p in e.get("paraphrase_prompts", [])],
        "forget": [fill(f) for f in task["forget"]],
        "forget_para": [p for f in task["forget"] for p in f["paraphrases"]],
        "retain": [fill(f) for f in task["retain"]],
        "remaining": [fill(f) for f in task["remaining"]],
    }
    return {k: v for k, v in sets.items() if v}


def router_rates(handle, task: dict) -> dict:
    """Share of each query set for which the applied codebook's router fires."""
    from loka.methods.codebook import applied_codebooks

    book = applied_codebooks(handle.model)[0].runtime
    return {
        k: float((book.router_probs(v) >= book.router_threshold).float().mean())
        for k, v in _query_sets(task).items()
    }


def memory_rates(handle, task: dict) -> dict:
    """Share of each query set answered with a memory: the router fires *and* the retrieval gate
    (``match_threshold``) lets the query through."""
    from loka.methods.codebook import LokaModel

    lm = LokaModel(handle)
    return {k: sum(j >= 0 for j in lm.route(v)) / len(v) for k, v in _query_sets(task).items()}


def run_row(handle, name: str, task: dict, over: dict) -> tuple[dict, dict]:
    edits, forget, retain = requests_of(task)
    t = time.time()
    arts, info = [], {}
    try:
        if name in TWO_STEP:
            arts.append(loka.edit(handle, edits, TWO_STEP[name], None))
            arts.append(loka.unlearn(handle, forget, retain, "npo"))
        else:
            art = loka.update(handle, edits, forget, retain, method=JOINT[name], hparams=over or None)
            arts.append(art)
        seconds = time.time() - t
        row = joint_metrics(handle, task)
        if arts[-1].method == "loka":
            x = arts[-1].manifest["extra"]
            info = {
                "router": router_rates(handle, task),
                "to_memory": memory_rates(handle, task),
                "memories": len(x["memories"]),
                "separate": sum(c["memories"] == "separate" for c in x["conflict"]),
                "shared": sum(c["memories"] == "shared" for c in x["conflict"]),
                "conflict_scores": [c["score"] for c in x["conflict"]],
            }
    finally:
        for a in reversed(arts):
            a.revert(handle)
    return {**row, "seconds": round(seconds, 1)}, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/generated/cf_smollm2.json")
    ap.add_argument("--settings", nargs="+", default=["in", "out"], choices=["in", "out"])
    ap.add_argument("--n-edit", type=int, default=25)
    ap.add_argument("--n-forget", type=int, default=25)
    ap.add_argument("--n-retain", type=int, default=50)
    ap.add_argument("--n-remaining", type=int, default=40, help="evaluate rem-* on this many held-out facts")
    ap.add_argument("--methods", nargs="+", default=["unedited", *METHODS], choices=["unedited", *METHODS])
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="hyperparameter override (loka row)"
    )
    ap.add_argument(
        "--variant", default=None, help="row name for a loka run with --set overrides (default loka)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    over = parse_overrides(args.set)
    records = json.loads(Path(args.data).read_text())
    handle = loka.load_model(args.model)
    started = stamp()
    out = Path(args.out or f"benchmarks/results/joint_update_{args.model}.json")
    res = json.loads(out.read_text()) if out.exists() else {"model": args.model, "settings": {}}
    for setting in args.settings:
        task = build_tasks(records, setting, args.n_edit, args.n_forget, args.n_retain, seed=0)
        task["remaining"] = task["remaining"][: args.n_remaining]
        size = {
            "edit": len(task["edit"]),
            "forget": len(task["forget"]),
            "retain": len(task["retain"]),
            "remaining": len(task["remaining"]),
        }
        block = res["settings"].get(setting)
        if not block or block.get("size") != size:
            block = res["settings"][setting] = {"size": size, "relations": task["relations"], "rows": {}}
        for name in args.methods:
            label = args.variant if (name == "loka" and args.variant) else name
            t = time.time()
            if name == "unedited":
                row, info = {**joint_metrics(handle, task), "seconds": 0.0}, {}
            else:
                row, info = run_row(handle, name, task, over if name == "loka" else {})
            row = {
                **row,
                **({"info": info} if info else {}),
                **({"overrides": over} if name == "loka" and over else {}),
            }
            block["rows"] = merge_rows(block["rows"], {label: row}, started)
            write_result(out, res, provenance=started)
            print(setting, label, json.dumps(row), f"({time.time() - t:.0f}s)", flush=True)
    for setting, block in res["settings"].items():
        s = block["size"]
        print(
            f"\n| {args.model} {setting}-profile: edit {s['edit']}, forget {s['forget']}, retain {s['retain']}, "
            f"remaining {s['remaining']} | " + " | ".join(KEYS) + " | s |"
        )
        print("|---" * (len(KEYS) + 2) + "|")
        for name, r in block["rows"].items():
            print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + f" | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
