"""mini-TOFU: fine-tune SmolLM2 on the TOFU questions we have, unlearn forget10, measure forget quality
and model utility against a retain-only model.

    python benchmarks/mini_tofu.py --model smollm2-135m --split forget10 --methods ga gd npo simnpo idk dpo relearn

1. ``loka data tofu`` logic: every split with a templated paraphrased question and entity-swapped
   perturbed answers (:mod:`loka.bench.tofu`);
2. ``loka finetune`` on every forget question + retain (the "full" model) and on retain alone (the
   reference); both are cached in ``--work`` and reused;
3. for each method: unlearn the split (forget requests) with the retain set, evaluate with
   :func:`loka.forgetting.metrics.tofu_eval` (forget quality = KS p-value of forget truth ratios against
   the reference's; model utility = harmonic mean of retain / real authors / world facts P̄, ROUGE-L,
   truth ratio), revert.

Prints a markdown table and writes ``benchmarks/results/mini_tofu_<model>_<split>.json`` (rows of
earlier runs with the same setup are kept; each row carries the provenance of the run that wrote it).

**With an edit set** (``--edit-n N --methods loka npo memit ...``; LOKA's joint task on mini-TOFU):
N retain questions (from the end of the retain set used) get a counterfactual answer by entity swap
(:func:`loka.bench.tofu.tofu_edits`) and leave the retain set. Each method runs ``loka.update`` with
the edits, the forget split and the rest of the retain set (single-task methods run the two tasks one
after the other, as ``loka update`` does). Adds to forget quality / model utility: ``edt-rl`` /
``edt-prl`` (ROUGE-L recall of the new answer on the question / its templated paraphrase) and
``edt-ent`` / ``edt-pent`` (share of greedy answers that contain the swapped-in entity: the new
answer differs from the old in that span only, so ROUGE alone says little). Results go to
``mini_tofu_<model>_<split>_edit<N>.json``.
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
from loka.bench.tofu import as_requests, build_mini_tofu, edit_requests, tofu_edits
from loka.cli.common import parse_overrides
from loka.finetune import finetune
from loka.forgetting.metrics import rouge_l_recall, tofu_eval
from loka.requests import QA_PROMPT, ForgetRequest, RetainRequest
from loka.resources import data_dir
from loka.scoring import generate
from loka.utils.io import cached_json, hash_json

DATA = data_dir() / "tofu"


def _lines(name: str) -> list[dict]:
    return [json.loads(x) for x in (DATA / name).read_text().splitlines() if x.strip()]


def _tuned(base: str, recs: list[dict], out: Path, epochs: int, lr: float) -> tuple[loka.ModelHandle, dict]:
    if not (out / "loka_finetune.json").exists():
        h = loka.load_model(base)
        finetune(
            h,
            [QA_PROMPT.format(r["question"]) for r in recs],
            [r["answer"] for r in recs],
            out,
            epochs=epochs,
            lr=lr,
        )
        del h
    return loka.load_model(str(out)), json.loads((out / "loka_finetune.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", default="forget10", choices=["forget01", "forget05", "forget10"])
    ap.add_argument("--methods", nargs="+", default=["ga", "gd", "npo", "simnpo", "idk", "dpo", "relearn"])
    ap.add_argument(
        "--retain-n", type=int, default=None, help="use the first N retain questions (default: all 300)"
    )
    ap.add_argument(
        "--finetune-set",
        choices=["split", "all"],
        default="split",
        help="fine-tune on the split + retain (default) or on every forget question + retain",
    )
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyperparameter override for every method (the row is labelled 'METHOD KEY=VALUE')",
    )
    ap.add_argument(
        "--edit-n",
        type=int,
        default=0,
        help="also edit N retain questions to an entity-swapped answer (joint edit + forget; methods via loka update)",
    )
    ap.add_argument("--work", default="out/mini_tofu")
    args = ap.parse_args()
    work = Path(args.work) / f"{args.model}-{args.split}-r{args.retain_n or 300}-e{args.epochs}-lr{args.lr:g}"
    d = build_mini_tofu()
    real, world = _lines("real_authors_perturbed.json"), _lines("world_facts_perturbed.json")
    forget, retain = d[args.split], d["retain"][: args.retain_n]
    edits = tofu_edits(retain[::-1], args.edit_n) if args.edit_n else []
    tuned_on = retain  # both models are fine-tuned on the edit questions too (their old answers)
    retain = [r for r in retain if r["question"] not in {e["question"] for e in edits}]
    overrides = parse_overrides(args.set)

    ref, ref_info = _tuned(args.model, tuned_on, work / "retain_only", args.epochs, args.lr)
    started = stamp()  # after the first model load, which sets the threads
    ref_eval = _cached(
        ref,
        work / "retain_only",
        [forget, retain, real, world, args.max_new_tokens, None],
        lambda h=ref: tofu_eval(h, forget, retain, real, world, max_new_tokens=args.max_new_tokens),
    )
    reference = ref_eval["forget_tr_raw"]
    del ref
    tune = (d["forget_all"] if args.finetune_set == "all" else forget) + tuned_on
    full, full_info = _tuned(args.model, tune, work / f"full-{args.finetune_set}", args.epochs, args.lr)
    rows = {"retain-only (reference)": {**_row(ref_eval, reference), "seconds": ref_info["seconds"]}}
    ev = _cached(
        full,
        work / f"full-{args.finetune_set}",
        [forget, retain, real, world, args.max_new_tokens, reference, edits],
        lambda: {
            **tofu_eval(full, forget, retain, real, world, reference, max_new_tokens=args.max_new_tokens),
            "edit_scores": _edit_scores(full, edits),
        },
    )
    rows["fine-tuned (before unlearning)"] = {
        **_row(ev),
        **ev["edit_scores"],
        "seconds": full_info["seconds"],
    }
    print(json.dumps(rows), flush=True)
    res = (
        Path("benchmarks/results")
        / f"mini_tofu_{args.model}_{args.split}{f'_edit{len(edits)}' if edits else ''}.json"
    )
    setup = {
        "split": args.split,
        "retain_n": len(retain),
        "finetune_set": args.finetune_set,
        "epochs": args.epochs,
        "lr": args.lr,
        "max_new_tokens": args.max_new_tokens,
        **({"edit_n": len(edits)} if edits else {}),
    }

    def earlier() -> dict:  # rows in the file now (a parallel invocation may have added some)
        old = json.loads(res.read_text()) if res.exists() else {}
        return old.get("rows", {}) if old.get("setup") == setup else {}

    def save() -> None:  # after every row, so an interrupted run keeps what it measured
        write_result(
            res,
            {
                "model": args.model,
                "setup": setup,
                "finetune": {"full": full_info, "retain_only": ref_info},
                "rows": merge_rows(earlier(), rows, started),
            },
            provenance=started,
        )

    save()
    freqs, rreqs = as_requests(forget, ForgetRequest), as_requests(retain, RetainRequest)
    rewritten = as_requests(forget, ForgetRequest, relearn=True)  # ReLearn's targets (relearn_rewrite)
    for m in args.methods:
        t0 = time.time()
        fr = rewritten if m == "relearn" or overrides.get("forget_loss") == "relearn" else freqs
        if edits:
            art = loka.update(full, edit_requests(edits), fr, rreqs, method=m, hparams=overrides or None)
        else:
            art = loka.unlearn(full, fr, rreqs, method=m, hparams=overrides or None)
        secs = time.time() - t0
        try:
            ev = tofu_eval(full, forget, retain, real, world, reference, max_new_tokens=args.max_new_tokens)
            es = _edit_scores(full, edits)
        finally:
            art.revert(full)
        label = m + (" " + ",".join(args.set) if args.set else "")
        rows[label] = {
            **_row(ev),
            **es,
            "seconds": round(secs, 1),
            "steps": art.manifest["extra"].get("steps"),
        }
        print(label, json.dumps(rows[label]), flush=True)
        save()

    cols = [
        "forget_quality",
        "model_utility",
        "forget_rouge",
        "forget_para_rouge",
        "forget_tr",
        "retain_rouge",
        "real_authors_p",
        "world_facts_p",
        "seconds",
    ]
    if edits:
        cols[-1:-1] = ["edt-rl", "edt-prl", "edt-ent", "edt-pent"]
    print(f"\n| {args.model}, mini-TOFU {args.split} ({len(forget)} questions) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for label, r in {**earlier(), **rows}.items():
        print(f"| {label} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")


def _cached(handle, where: Path, inputs: list, evaluate) -> dict:
    """``evaluate()``, or its result saved in ``where`` when the weights' hash and the ``inputs`` (the
    questions, generation length, reference) are the same; the file carries its full key and is
    recomputed when it does not match or cannot be read."""
    key = hash_json([handle.model_hash, inputs, loka.__version__])
    return cached_json(where / f"tofu_eval-{key[:16]}.json", key, evaluate)


def _edit_scores(handle, edits: list[dict], max_new_tokens: int = 48) -> dict:
    """edt-rl / edt-prl (ROUGE-L recall of the new answer) and edt-ent / edt-pent (the swapped-in
    entity appears in the greedy answer) on the edit questions and their paraphrases."""
    if not edits:
        return {}
    out = {}
    for name, field in (("", "question"), ("p", "paraphrased_question")):
        gens = generate(handle, [QA_PROMPT.format(e[field]) for e in edits], max_new_tokens=max_new_tokens)
        out[f"edt-{name}rl"] = sum(rouge_l_recall(g, e["answer"]) for g, e in zip(gens, edits)) / len(edits)
        out[f"edt-{name}ent"] = sum(e["new_entity"] in g for g, e in zip(gens, edits)) / len(edits)
    return out


def _row(ev: dict, reference=None) -> dict:
    out = {
        "model_utility": ev.get("model_utility"),
        "forget_quality": ev.get("forget_quality", 1.0 if reference else None),
    }
    for s in ("forget", "retain", "real_authors", "world_facts"):
        for k, v in ev.get(s, {}).items():
            out[f"{s}_{k}"] = v
    return out


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and v < 1e-3 and v > 0:
        return f"{v:.1e}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
