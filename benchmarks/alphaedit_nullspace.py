"""How well AlphaEdit's null space protects what it must keep, per statistics source and threshold.

    python benchmarks/alphaedit_nullspace.py --stats self:20000 tofu self:100000 \
        --thresholds 2e-2 1e-2 5e-3 2e-3 1e-3

AlphaEdit projects every update onto ``P``, the span of the eigenvectors of ``C = E[k kᵀ]`` whose
eigenvalues fall below a threshold (AlphaEdit Eq. 5-7), so that ``ΔW k ≈ 0`` for preserved keys ``k``.
That holds only for keys ``C`` describes. For each statistics source (the corpus and number of tokens
``C`` is estimated from) and threshold, at every layer AlphaEdit edits, this script measures on keys
that were *not* in ``C``:

* ``rank``: the dimension of the null space (of the MLP's hidden width);
* ``leak_nbr``: the mean fraction ``‖P k‖² / ‖k‖²`` of the keys of the lifelong stream's neighbourhood
  prompts (every position) that lies in the null space — the part of those keys an update still moves
  (0 is full protection; what NS measures);
* ``leak_text``: the same for the held-out sentences of the perplexity guard;
* ``in_sample``: the same fraction for the keys ``C`` was estimated from (``Σ_{λ<th} λ / Σ λ``), to tell
  a poor estimate (held-out leak far above it) from a flat spectrum (both high);
* ``keep_edit``: the same fraction for the edit keys (the last subject token of each rewrite prompt) —
  the part of an edit key the update can use (1 keeps the edit fully reachable; what ES needs).

A good setting has a small leak and a large keep. Writes
``benchmarks/results/alphaedit_nullspace_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _stamp import stamp, write_result

import loka
from loka.corpus import corpus_from_spec
from loka.eval.guard import heldout_texts
from loka.methods import default_hparams
from loka.trace import inputs_by_batch


def _keys(handle, path: str, texts: list[str]) -> torch.Tensor:
    """Every non-padding position's input to ``path`` (N, d)."""
    out = []
    for x, mask in inputs_by_batch(handle, path, texts):
        out.append(x[mask.bool()].float())
    return torch.cat(out)


def _subject_keys(handle, path: str, records: list[dict]) -> torch.Tensor:
    """The input to ``path`` at each rewrite prompt's last subject token (N, d)."""
    tok = handle.tokenizer
    rows = []
    for r in records:
        rw = r["requested_rewrite"]
        prefix, _ = rw["prompt"].split("{}", 1)
        text = prefix + rw["subject"]
        n = len(tok(text)["input_ids"])
        x, _mask = next(inputs_by_batch(handle, path, [text]))
        rows.append(x[0, n - 1].float())
    return torch.stack(rows)


def _fraction_in(U: torch.Tensor, k: torch.Tensor) -> float:
    """Mean ‖U Uᵀ k‖² / ‖k‖² (U orthonormal columns)."""
    k = k.double()
    return float(((k @ U).pow(2).sum(1) / k.pow(2).sum(1).clamp_min(1e-12)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model name (default smollm2-135m)")
    ap.add_argument(
        "--stats",
        nargs="+",
        default=["self:20000", "tofu"],
        help="statistics sources as CORPUS:TOKENS (corpus: self, tofu, a file; default self:20000 tofu)",
    )
    ap.add_argument(
        "--thresholds",
        nargs="+",
        type=float,
        default=[2e-2, 1e-2, 5e-3, 2e-3, 1e-3],
        help="eigenvalue cut-offs",
    )
    ap.add_argument("--data", default="data/generated/lifelong_10000.json", help="lifelong stream (JSON)")
    ap.add_argument("--n", type=int, default=300, help="records whose prompts give the held-out keys")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/...)")
    args = ap.parse_args()
    prov = stamp()
    handle = loka.load_model(args.model)
    layers = default_hparams("alphaedit", handle).layers
    records = json.loads(Path(args.data).read_text())[: args.n]
    nbr = [p for r in records for p in r["neighborhood_prompts"]]
    text = heldout_texts(100)
    rows = []
    for spec in args.stats:
        corpus_name, _, n_tok = spec.partition(":")
        n_tokens = int(n_tok) if n_tok else 40_000
        corpus = corpus_from_spec(corpus_name, handle, n_tokens=n_tokens)
        C = loka.second_moments(handle, layers, corpus, n_tokens)
        for layer in layers:
            path = handle.spec.mlp_out_path(layer)
            k_nbr, k_text, k_edit = (
                _keys(handle, path, nbr),
                _keys(handle, path, text),
                _subject_keys(handle, path, records),
            )
            evals, evecs = torch.linalg.eigh(C[layer].double())
            for th in args.thresholds:
                U = evecs[:, evals < th]
                row = {
                    "stats": spec,
                    "layer": layer,
                    "threshold": th,
                    "rank": int(U.shape[1]),
                    "dim": int(C[layer].shape[0]),
                    "in_sample": float(evals[evals < th].sum() / evals.sum()),
                    "leak_nbr": _fraction_in(U, k_nbr),
                    "leak_text": _fraction_in(U, k_text),
                    "keep_edit": _fraction_in(U, k_edit),
                }
                rows.append(row)
                print(
                    f"{spec:>12} L{layer} th {th:<6g} rank {row['rank']:>4}/{row['dim']}  "
                    f"in_sample {row['in_sample']:.3f}  leak_nbr {row['leak_nbr']:.3f}  leak_text {row['leak_text']:.3f}  "
                    f"keep_edit {row['keep_edit']:.3f}",
                    flush=True,
                )
    out = Path(args.out or f"benchmarks/results/alphaedit_nullspace_{args.model}.json")
    write_result(
        out, {"model": args.model, "layers": layers, "n_records": args.n, "rows": rows}, provenance=prov
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
