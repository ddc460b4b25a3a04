"""Spectrum of sequential ROME edits with and without PRUNE (PRUNE's analysis, Ma et al. 2024).

    python benchmarks/rome_spectrum.py --model smollm2-135m --n 200 --every 10

One ROME edit after another (no revert) on generated CounterFact records, once plain and once with
PRUNE (log base e) restraining the accumulated update after every edit. After every ``--every``
edits: σ_max, σ_min and the condition number of the edited matrix, σ_max of the accumulated update
(``loka.analysis.spectrum``), held-out perplexity, and whether the edits so far still hold (CounterFact's efficacy
over the edits so far). Asserts that no weight is NaN/Inf. Prints a
table, writes ``benchmarks/results/rome_spectrum_<model>.json`` and a PNG of the three spectral
quantities for both runs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _stamp import stamp, write_result
from tqdm import tqdm

import loka
from loka.analysis import plot_spectrum, spectrum
from loka.eval.data import load_cases
from loka.eval.guard import heldout_texts, perplexity
from loka.scoring import target_logprobs


def _holds(handle, cases) -> float:
    """CounterFact's efficacy over the edits so far: share of edit prompts where the new target is
    more likely than the true one."""
    prompts = [c.rewrite[0] for c in cases]
    lp = target_logprobs(handle, prompts * 2, [c.target_new for c in cases] + [c.target_true for c in cases])
    new, old = lp[: len(cases)], lp[len(cases) :]  # one call: each prompt is run once for both targets
    return sum(a["logprob"] > b["logprob"] for a, b in zip(new, old)) / len(cases)


def run(handle, cases, prune: float | None, every: int, texts: list[str]) -> dict:
    st = loka.EditState()
    arts, checks = [], []
    t0 = time.perf_counter()
    label = "ROME + PRUNE" if prune else "ROME"
    try:
        for i, case in enumerate(tqdm(cases, desc=label, unit="edit"), 1):
            arts.append(loka.edit(handle, case.requests, "rome", state=st, prune=prune, progress=False))
            if i % every == 0 or i == len(cases):
                bad = [n for n in arts[-1].weight_deltas() if not torch.isfinite(handle.param(n)).all()]
                assert not bad, f"non-finite weights after {i} edits: {bad}"
                checks.append(
                    {
                        "n_edits": i,
                        "ppl": perplexity(handle, texts),
                        "holds": _holds(handle, cases[:i]),
                        "seconds": time.perf_counter() - t0,
                    }
                )
                tqdm.write(
                    f"{label}: {i} edits, perplexity {checks[-1]['ppl']:.1f}, "
                    f"edits holding {checks[-1]['holds']:.2f}"
                )
    finally:
        for a in reversed(arts):  # back to the unedited weights, bit for bit
            a.revert(handle)
    return {"label": label, "prune": prune, "checks": checks, "spectrum": spectrum(handle, arts, every=every)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/generated/cf_all_300.json")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=math.e, help="PRUNE's log base")
    args = ap.parse_args()
    handle = loka.load_model(args.model)
    started = stamp()
    cases = load_cases(args.data, args.n)
    texts = heldout_texts(50)
    base_ppl = perplexity(handle, texts)
    runs = [run(handle, cases, None, args.every, texts), run(handle, cases, args.alpha, args.every, texts)]
    res = {
        "model": args.model,
        "n": args.n,
        "every": args.every,
        "alpha": args.alpha,
        "data": args.data,
        "unedited_ppl": base_ppl,
        "runs": runs,
    }
    out = Path("benchmarks/results") / f"rome_spectrum_{args.model}.json"
    write_result(out, res, provenance=started)
    plot_spectrum(
        {r["label"]: r["spectrum"] for r in runs},
        out.parent / "plots" / f"rome_spectrum_{args.model}.png",
        title=f"{args.model}: {args.n} sequential ROME edits, with and without PRUNE (α={args.alpha:.2f})",
    )
    print(f"\nunedited perplexity {base_ppl:.1f}")
    print(
        f"{'run':14s} {'edits':>5s} {'σ_max':>8s} {'cond':>8s} {'σ_max(ΣΔ)':>10s} {'ppl':>8s} {'holding':>7s}"
    )
    for r in runs:
        by_n = {s["n_edits"]: s for s in r["spectrum"]}
        for c in r["checks"]:
            s = by_n.get(c["n_edits"])
            if s is None or (c["n_edits"] % (5 * args.every) and c["n_edits"] != args.n):
                continue
            print(
                f"{r['label']:14s} {c['n_edits']:5d} {s['sigma_max']:8.2f} {s['cond']:8.1f} "
                f"{s['delta_sigma_max']:10.2f} {c['ppl']:8.1f} {c['holds']:7.2f}"
            )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
