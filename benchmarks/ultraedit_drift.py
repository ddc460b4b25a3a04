"""Where a long UltraEdit stream breaks: each turn's weight shift, the edited matrices' growth and the
lifelong statistics, batch by batch, and the requests behind the first oversized turn.

    python benchmarks/ultraedit_drift.py --run out/lifelong/smollm2-135m-ultraedit-b100-n10000-s300

Reads a lifelong run folder of ``benchmarks/lifelong.py --rows ultraedit`` (its per-batch artifacts and
the :class:`~loka.state.EditState` snapshots of the normalisation statistics) and reports per batch:

* ``shift``: the spectral norm ``‖Δ_b‖₂`` of the turn's shift, per edited matrix;
* ``growth``: ``‖ΣΔ‖₂ / ‖W‖₂``, the edits so far against the unedited matrix;
* ``g_spread`` / ``k_spread``: the statistics' mean per-dimension spread of the gradient and key parts
  of ``z = [k | g]``, which normalise every turn's pseudo-values.

The first turn whose shift exceeds ``--spike`` × the median shift of the turns before it is the
*spike*. For it and the turn before it, the model is rebuilt as it was before the spike (the earlier artifacts applied)
and each request's answer-gradient row at the first edited matrix is measured alone: the largest
rows, against the turn's median, show whether one request drove the turn.

Writes ``benchmarks/results/ultraedit_drift_<model>.json``.
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
from loka.eval.data import load_cases
from loka.methods.ultraedit import keys_and_gradients


def _spectral(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double(), 2))


def _stats(state_file: Path) -> list[dict]:
    """Per batch, the statistics' row count and mean spread of the key and gradient parts."""
    out = []
    with safe_open(str(state_file), "pt") as f:
        names = sorted((int(k.rsplit("@", 1)[1]), k) for k in f.keys() if k.startswith("ultraedit.stats."))
        shape = names[0][1].split(".")[2].split("@")[0]
        d_in = int(shape.split("x")[0])
        for _, k in names:
            t = f.get_tensor(k).double()
            n, d = float(t[0]), (t.numel() - 1) // 2
            sd = (t[1 + d :] / (n - 1)).sqrt()
            out.append(
                {"rows": int(n), "k_spread": float(sd[:d_in].mean()), "g_spread": float(sd[d_in:].mean())}
            )
    return out


def _request_gradients(handle, requests, layer: int) -> list[float]:
    """Each request's largest answer-gradient row norm at ``layer``'s matrix, measured alone."""
    rows = keys_and_gradients(handle, list(requests), [layer], batch_size=1)[layer]
    return [float(g.norm(dim=1).max()) for _, g in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a lifelong run folder of UltraEdit (artifacts/ and state/)")
    ap.add_argument("--model", default="smollm2-135m", help="model name (default smollm2-135m)")
    ap.add_argument(
        "--data", default="data/generated/lifelong_10000.json", help="the stream the run edited, in order"
    )
    ap.add_argument("--spike", type=float, default=4.0, help="a shift this many times the earlier median")
    ap.add_argument("--top", type=int, default=5, help="requests listed per measured turn")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/...)")
    args = ap.parse_args()
    prov = stamp()
    run = Path(args.run)
    cfg = json.loads((run / "config.json").read_text())
    bs = int(cfg["batch_size"])
    handle = loka.load_model(args.model)
    arts = sorted((run / "artifacts").glob("batch_*.loka"))
    stats = _stats(run / "state" / "state.safetensors")
    W = {}
    total: dict[str, torch.Tensor] = {}
    series, spike = [], None
    for b, path in enumerate(arts):
        art = loka.load_artifact(path)
        row = {"batch": b + 1, "edits": 0, "shift": {}, "growth": {}, **stats[b]}
        for name, d in sorted(art.deltas.items()):
            if name not in W:
                W[name] = handle.param(name).detach().double().clone()
            total[name] = total.get(name, 0) + d.double()
            row["shift"][name] = _spectral(d)
            row["growth"][name] = _spectral(total[name]) / _spectral(W[name])
        row["edits"] = (b + 1) * bs
        series.append(row)
        top = max(row["shift"].values())
        before = [max(r["shift"].values()) for r in series[:-1]]
        if spike is None and len(before) >= 5 and top > args.spike * float(torch.tensor(before).median()):
            spike = b + 1
        print(
            f"batch {b + 1:>3}: shift {' '.join(f'{v:7.1f}' for v in row['shift'].values())}"
            f"  growth {' '.join(f'{v:5.2f}' for v in row['growth'].values())}"
            f"  g spread {row['g_spread']:.2e}  k spread {row['k_spread']:.3f}",
            flush=True,
        )
    culprits = {}
    if spike is not None:
        layer = min(cfg.get("hparams", {}).get("layers") or loka.default_hparams("ultraedit", handle).layers)
        firsts = [c.requests[0] for c in load_cases(args.data, spike * bs)]
        fresh = loka.load_model(args.model)
        for i in range(spike - 1):  # the model as it was before the oversized turn
            loka.load_artifact(arts[i]).apply(fresh)
        for b in (spike - 1, spike):
            reqs = firsts[(b - 1) * bs : b * bs]
            norms = _request_gradients(fresh, reqs, layer)
            order = sorted(range(len(norms)), key=lambda i: -norms[i])[: args.top]
            med = float(torch.tensor(norms).median())
            culprits[str(b)] = {
                "median": med,
                "top": [
                    {
                        "request": reqs[i].prompt.format(reqs[i].subject),
                        "target": reqs[i].target_new,
                        "norm": norms[i],
                        "x_median": norms[i] / med,
                    }
                    for i in order
                ],
            }
            print(
                f"batch {b}: median gradient row {med:.4f}; largest",
                [round(norms[i] / med, 1) for i in order],
            )
    out = Path(args.out or f"benchmarks/results/ultraedit_drift_{args.model}.json")
    payload = {"model": args.model, "run": cfg, "spike": spike, "series": series, "culprits": culprits}
    write_result(out, payload, provenance=prov)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
