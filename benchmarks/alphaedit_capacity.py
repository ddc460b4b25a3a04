"""How much of AlphaEdit's null space the edits themselves use up, batch after batch.

    python benchmarks/alphaedit_capacity.py --run out/lifelong/smollm2-135m-alphaedit-b100-n10000-s300

AlphaEdit solves ``ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + L2·I)⁻¹`` (AlphaEdit Eq. 9): inside the null
space ``P`` an update may not move the keys of earlier edits ``K_p`` either. Along an eigenvector of
``P K_p K_pᵀ P`` whose eigenvalue is well above ``L2`` the earlier edits dominate the regulariser, so
that direction is *taken*: a new key can use it only by disturbing an old edit. The null space is a
fixed budget of dimensions (``rank``); each batch of edits takes some of it. This script reads the keys
a lifelong run stored after every batch (the :class:`~loka.state.EditState` of ``benchmarks/lifelong.py
--rows alphaedit``) and reports, per edited layer, after ``b`` batches:

* ``taken``: eigenvalues of ``P K_p K_pᵀ P`` above ``L2`` — null-space dimensions the earlier edits hold;
* ``rank``: the null space's dimension (``P``'s rank);
* ``blocked``: the mean share ``‖U_t U_tᵀ P k‖² / ‖P k‖²`` of batch ``b+1``'s projected keys that falls in
  the taken directions (0: the next edits meet free space; near 1: they compete with earlier edits).

Writes ``benchmarks/results/alphaedit_capacity_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _stamp import stamp, write_result
from safetensors import safe_open

import loka
from loka.corpus import corpus_from_spec
from loka.methods import default_hparams
from loka.methods.alphaedit import cached_projection


def _batch_keys(state_file: Path, weight: str) -> list[torch.Tensor]:
    """The keys stored for ``weight`` after each batch, in batch order."""
    prefix = f"alphaedit.keys.{weight}@"
    with safe_open(str(state_file), "pt") as f:
        names = sorted((int(k[len(prefix) :]), k) for k in f.keys() if k.startswith(prefix))
        return [f.get_tensor(k).double() for _, k in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a lifelong run folder of AlphaEdit (with state/)")
    ap.add_argument("--model", default="smollm2-135m", help="model name (default smollm2-135m)")
    ap.add_argument(
        "--after", nargs="+", type=int, default=[1, 3, 5, 10], help="batches done before the one measured"
    )
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/...)")
    args = ap.parse_args()
    prov = stamp()
    run = Path(args.run)
    cfg = json.loads((run / "config.json").read_text())
    handle = loka.load_model(args.model)
    hp = default_hparams("alphaedit", handle)
    for k, v in cfg.get("hparams", {}).items():
        setattr(hp, k, v)
    corpus = corpus_from_spec(hp.mom2_corpus, handle, hp.mom2_n_tokens)
    C = loka.second_moments(handle, hp.layers, corpus, hp.mom2_n_tokens)
    rows = []
    for layer in hp.layers:
        P, rank = cached_projection(handle, layer, C[layer], hp.nullspace_threshold)
        P = P.double()
        keys = _batch_keys(run / "state" / "state.safetensors", handle.weight_name(layer))
        for b in args.after:
            if b >= len(keys):
                continue
            past = P @ torch.cat(keys[:b]).T  # (d, b·n) projected earlier keys
            evals, evecs = torch.linalg.eigh(past @ past.T)
            U = evecs[:, evals > hp.L2]
            nxt = keys[b] @ P  # the next batch's keys, projected
            share = (nxt @ U).pow(2).sum(1) / nxt.pow(2).sum(1).clamp_min(1e-12)
            row = {
                "layer": layer,
                "batches": b,
                "edits": int(sum(len(k) for k in keys[:b])),
                "taken": int(U.shape[1]),
                "rank": rank,
                "dim": int(P.shape[0]),
                "blocked": float(share.mean()),
            }
            rows.append(row)
            print(
                f"L{layer} after {row['edits']:>5} edits: taken {row['taken']:>4} of rank {rank:>4}/{row['dim']}"
                f"  next batch blocked {row['blocked']:.3f}",
                flush=True,
            )
    out = Path(args.out or f"benchmarks/results/alphaedit_capacity_{args.model}.json")
    payload = {
        "model": args.model,
        "run": cfg,
        "layers": hp.layers,
        "L2": hp.L2,
        "threshold": hp.nullspace_threshold,
        "rows": rows,
    }
    write_result(out, payload, provenance=prov)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
