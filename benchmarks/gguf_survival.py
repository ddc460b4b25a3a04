"""Do edits survive GGUF export? 100 CounterFact edits on SmolLM2, exported to f16, q8_0, q4_1 and q4_0.

    LOKA_THREADS=1 python benchmarks/gguf_survival.py --n 100

Edits the first ``--n`` records of ``data/generated/cf_smollm2.json`` (CounterFact-format records of facts
SmolLM2 knows) twice: one MEMIT batch of ``n`` edits (one artifact), and ``n`` ROME edits applied one after
another (``n`` stacked artifacts, each computed on the model the earlier ones edited). Each edited model —
and the unedited one, the baseline of what quantisation alone does — is exported with
:func:`loka.export_gguf` to every type, read back with transformers' GGUF loader and scored on the
records (:func:`loka.export.gguf.verify_gguf`): the rewrite (the new target beats the old one, CounterFact's
ES), paraphrase and neighbourhood success, against the same scores on the in-memory model. Survival is
the share of the edits that succeeded in memory which still succeed in the file; flips count the records
whose rewrite outcome differs between memory and file in either direction (for the unedited model: how
often quantisation alone changes which answer wins).

With ``llama-cpp-python`` importable, each file is also loaded by llama.cpp and the rewrite prompts are
completed greedily (the share of completions that start with the new target); otherwise that part is
skipped with a message.

Artifacts are kept in ``--out`` (default ``out/gguf_survival``) and reused by a later run; the GGUF files
are deleted after their check unless ``--keep``. Writes ``benchmarks/results/gguf_survival_smollm2-135m.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import stamp, write_result

import loka
from loka.export.gguf import QUANTS, applied_requests, export_gguf, request_scores, verify_gguf

ORDER = ("f16", "q8_0", "q4_1", "q4_0")
assert set(ORDER) == set(QUANTS)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def edited_artifacts(handle, reqs, method: str, folder: Path) -> tuple[list, float | None]:
    """The artifacts of ``method`` for ``reqs``, applied to ``handle``: read from ``folder`` when a run made
    them before, else computed (and saved). Returns them and the seconds the edits took (None if reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    if method == "memit":
        path = folder / "memit.loka"
        if path.exists():
            return [loka.load_artifact(path).apply(handle)], None
        t0 = time.time()
        art = loka.edit(handle, reqs, "memit")
        art.save(path)
        return [art], time.time() - t0
    # ROME, one edit after another, each on the model the earlier ones edited (resumes where a run stopped)
    arts, t0, computed = [], time.time(), 0
    for i, r in enumerate(reqs):
        path = folder / f"rome-{i:04d}.loka"
        if path.exists():
            arts.append(loka.load_artifact(path).apply(handle))
            continue
        art = loka.edit(handle, r, "rome", progress=False)
        art.save(path)
        arts.append(art)
        computed += 1
        print(f"rome {i + 1}/{len(reqs)}", flush=True)
    return arts, (time.time() - t0 if computed == len(reqs) else None)


def llama_cpp_answers(path: Path, prompts: list[str], targets: list[str]) -> dict | None:
    """Greedy completions by llama.cpp of each prompt: the share that starts with its target."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False, seed=0)
    hits = 0
    for p, t in zip(prompts, targets):
        out = llm(p, max_tokens=6, temperature=0.0)["choices"][0]["text"]
        hits += out.strip().lower().startswith(t.strip().lower())
    return {"n": len(prompts), "starts_with_target": hits / len(prompts)}


def row_of(res, edit_seconds, llama) -> dict:
    reqs = res.requests
    return {
        "n": len(reqs),
        "es_before": _mean(float(r.before) for r in reqs),
        "es_after": _mean(float(r.after) for r in reqs),
        "succeeded_before": len(res.succeeded),
        "survived": len(res.survived),
        "survival": len(res.survived) / len(res.succeeded) if res.succeeded else None,
        "flips": sum(r.before != r.after for r in reqs),
        "ps_before": _mean(r.paraphrase_before for r in reqs),
        "ps_after": _mean(r.paraphrase_after for r in reqs),
        "ns_before": _mean(r.neighborhood_before for r in reqs),
        "ns_after": _mean(r.neighborhood_after for r in reqs),
        "bytes": res.bytes,
        "tensor_types": res.tensor_types,
        "export_seconds": res.seconds,
        "verify_seconds": res.verify_seconds,
        "tokenizer_identical": res.tokenizer_identical,
        "top1_agreement": res.top1_agreement,
        "edit_seconds": edit_seconds,
        "llama_cpp": llama,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/generated/cf_smollm2.json")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--methods", nargs="+", default=["none", "memit", "rome"], help="none = unedited")
    ap.add_argument("--quants", nargs="+", default=list(ORDER), choices=ORDER)
    ap.add_argument("--out", default="out/gguf_survival")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files")
    args = ap.parse_args()
    reqs = loka.read_requests(args.data)[: args.n]
    out = Path(args.out) / f"{args.model}-n{args.n}"
    handle = loka.load_model(args.model)
    started = stamp()  # after the first load, which applies the thread setting the stamp records
    rows: dict[str, dict] = {}
    llama_missing = importlib.util.find_spec("llama_cpp") is None
    if llama_missing:
        print("llama_cpp is not importable: the llama.cpp part is skipped", flush=True)
    for method in args.methods:
        arts, edit_seconds = ([], None) if method == "none" else edited_artifacts(handle, reqs, method, out)
        # the unedited model is scored on the same records (no artifact carries them)
        checked = [(method, r.to_dict()) for r in reqs] if method == "none" else applied_requests(handle)
        t0 = time.time()
        before = request_scores(handle, checked)
        print(f"{method}: scored in memory in {time.time() - t0:.0f} s", flush=True)
        for quant in args.quants:
            path = out / f"{method}-{quant}.gguf"
            res = export_gguf(handle, path, quant=quant, verify=False, force=True)
            verify_gguf(handle, path, res, requests=checked, before=before)
            llama = llama_cpp_answers(path, [c.text for c in res.requests], [c.target for c in res.requests])
            rows[f"{method}/{quant}"] = {"method": method, "quant": quant, **row_of(res, edit_seconds, llama)}
            print(json.dumps(rows[f"{method}/{quant}"]), flush=True)
            if not args.keep:
                path.unlink()
        for a in reversed(arts):
            a.revert(handle)
    payload = {
        "model": args.model,
        "data": args.data,
        "n": args.n,
        "methods": args.methods,
        "quants": args.quants,
        "llama_cpp": None if llama_missing else "llama_cpp",
        "rows": rows,
    }
    write_result(Path("benchmarks/results") / f"gguf_survival_{args.model}.json", payload, provenance=started)


if __name__ == "__main__":
    main()
