"""MEMOIR's retrieval: how much the masks of paraphrases, neighbours and unrelated prompts overlap the
edit prompts' masks, for a few mask sizes k, layers and prompt features; which τ separates them.

    python benchmarks/memoir_calibration.py --model smollm2-135m --n 40

The first ``--n`` records of the data are the stored edits (one mask per edit prompt, TopHash as
:mod:`loka.methods.memoir` computes it, background from its bundled sentences). Probes: each record's
paraphrase prompts (should retrieve their own record's mask), its neighbourhood prompts (same relation,
other subjects: should retrieve nothing) and the edit and paraphrase prompts of the next ``--n``
records (facts not in the memory: should retrieve nothing). For each setting it reports quantiles of
the best overlap per probe kind and, over a τ grid, the fraction of paraphrases that retrieve their own
mask against the fractions of neighbours and unrelated prompts that retrieve any. No edit is trained:
masks depend only on the unedited model. One forward per prompt covers every layer and feature.

The suggested τ (at the config's layer, prompt feature and top_k) maximises "paraphrases that retrieve
their own mask" minus "neighbours that fire". Then ``--edits`` records are edited one by one (a
sequential run, fresh state) with that τ and with the paper's 0.4, and scored (teacher-forced ES/PS/NS).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _stamp import stamp, write_result

import loka
from loka.eval.data import load_cases
from loka.eval.runner import EvalConfig, run_eval
from loka.methods.memoir import BACKGROUND, FEATURES, mask_columns, mask_width, permutation, prompt_features
from loka.trace import capture, run_until_stopped

ROOT = Path(__file__).resolve().parents[1]
Q = [0.1, 0.5, 0.9]
TAUS = [round(0.3 + 0.05 * i, 2) for i in range(14)]  # 0.30 … 0.95


def features(
    h, paths: list[str], texts: list[str], batch_size: int = 32
) -> dict[str, dict[str, torch.Tensor]]:
    """{path: {feature kind: (n, D)}} at the input of each module, one forward per batch of texts."""
    tok = h.tokenizer
    tok.padding_side = "right"
    out: dict[str, dict[str, list]] = {p: {k: [] for k in FEATURES} for p in paths}
    last = paths[-1]
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad(), capture(h.model, paths, outputs=False, stop_after=last) as rec:
            run_until_stopped(lambda enc=enc: h.model(**enc, use_cache=False))
        for p in paths:
            for k in FEATURES:
                out[p][k].append(prompt_features(rec[p].input, enc["attention_mask"], k))
    return {p: {k: torch.cat(v) for k, v in d.items()} for p, d in out.items()}


def overlaps(q: torch.Tensor, stored: torch.Tensor, width: int) -> torch.Tensor:
    """(n_q, n_stored) overlaps |m_q ∧ m_e| / k."""
    a = torch.zeros(len(q), width).scatter_(1, q, 1.0)
    b = torch.zeros(len(stored), width).scatter_(1, stored, 1.0)
    return a @ b.T / q.shape[1]


def quant(x: torch.Tensor) -> list[float]:
    return [round(float(v), 3) for v in x.float().quantile(torch.tensor(Q))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(ROOT / "data/generated/cf_all_300.json"))
    ap.add_argument("--n", type=int, default=40, help="stored edits (and as many unrelated records)")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: the config's layer ± a few")
    ap.add_argument("--k", type=float, nargs="+", default=[0.1, 0.2, 0.28, 0.4], help="top_k fractions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edits", type=int, default=8, help="records edited sequentially per τ (0: none)")
    ap.add_argument(
        "--paper-tau", type=float, default=0.4, help="also edit with this τ (the paper's ZsRE value)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    started = stamp()
    t0 = time.time()
    h = loka.load_model(args.model)
    default_layer = loka.default_hparams("memoir", h).layer
    layers = args.layers or sorted(
        {max(0, default_layer - 5), default_layer, min(h.n_layers - 1, default_layer + 3)}
    )
    paths = [h.spec.mlp_out_path(i) for i in layers]
    cases = load_cases(args.data, 2 * args.n)
    stored, unrel = cases[: args.n], cases[args.n :]
    edit = [c.rewrite[0] for c in stored]
    para = [(i, p) for i, c in enumerate(stored) for p in c.paraphrase]
    neigh = [(i, p) for i, c in enumerate(stored) for p in c.neighborhood]
    other = [c.rewrite[0] for c in unrel] + [p for c in unrel for p in c.paraphrase]
    texts = BACKGROUND + edit + [p for _, p in para] + [p for _, p in neigh] + other
    feats = features(h, paths, texts)
    cut = [len(BACKGROUND), len(edit), len(para), len(neigh), len(other)]
    para_owner = torch.tensor([i for i, _ in para])
    neigh_owner = torch.tensor([i for i, _ in neigh])
    rows = []
    for layer, path in zip(layers, paths):
        width = h.weight(layer).shape[1]
        perm = permutation(width, args.seed)
        for kind in FEATURES:
            bg_f, e_f, p_f, n_f, o_f = torch.split(feats[path][kind], cut)
            bg = bg_f.mean(0)
            for frac in args.k:
                k = mask_width(frac, width)
                m = {
                    name: mask_columns(f, bg, perm, k, kind)
                    for name, f in (("edit", e_f), ("para", p_f), ("neigh", n_f), ("other", o_f))
                }
                r_para = overlaps(m["para"], m["edit"], width)
                r_neigh = overlaps(m["neigh"], m["edit"], width)
                r_other = overlaps(m["other"], m["edit"], width)
                r_edit = overlaps(m["edit"], m["edit"], width).fill_diagonal_(0)
                p_best, p_arg = r_para.max(1)
                p_own = r_para[torch.arange(len(para)), para_owner]
                n_best = r_neigh.max(1).values
                n_own = r_neigh[torch.arange(len(neigh)), neigh_owner]
                o_best = r_other.max(1).values
                sweep = {
                    str(t): {
                        "paraphrase_retrieves_own": round(
                            float(((p_best >= t) & (p_arg == para_owner)).float().mean()), 3
                        ),
                        "neighbour_fires": round(float((n_best >= t).float().mean()), 3),
                        "unrelated_fires": round(float((o_best >= t).float().mean()), 3),
                    }
                    for t in TAUS
                }
                rows.append(
                    {
                        "layer": layer,
                        "prompt_feature": kind,
                        "top_k": frac,
                        "k": k,
                        "chance": round(k / width, 3),
                        "paraphrase_own": quant(p_own),
                        "paraphrase_best": quant(p_best),
                        "paraphrase_argmax_own": round(float((p_arg == para_owner).float().mean()), 3),
                        "neighbour_own": quant(n_own),
                        "neighbour_best": quant(n_best),
                        "unrelated_best": quant(o_best),
                        "other_edit_best": quant(r_edit.max(1).values),
                        "tau_sweep": sweep,
                    }
                )
    hp = loka.default_hparams("memoir", h)
    at = next(
        r
        for r in rows
        if r["layer"] == hp.layer and r["prompt_feature"] == hp.prompt_feature and r["top_k"] == hp.top_k
    )
    gap = {t: v["paraphrase_retrieves_own"] - v["neighbour_fires"] for t, v in at["tau_sweep"].items()}
    tau = max(gap, key=lambda t: (round(gap[t], 6), float(t)))
    suggested = {
        "layer": hp.layer,
        "prompt_feature": hp.prompt_feature,
        "top_k": hp.top_k,
        "tau": float(tau),
        **at["tau_sweep"][tau],
    }
    print(f"suggested τ at layer {hp.layer}, {hp.prompt_feature}, top_k {hp.top_k}: {suggested}")
    edits = {}
    for t in dict.fromkeys([float(tau), args.paper_tau]) if args.edits else []:
        cfg = EvalConfig(method="memoir", mode="sequential", batch_size=1, hparams={"tau": t}, guard=False)
        t1 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            s = run_eval(h, cases[: args.edits], cfg, Path(tmp) / "run")
        edits[str(t)] = {
            **{k: round(s["post"][k], 4) for k in ("ES", "PS", "NS", "S") if k in s["post"]},
            "unedited": {k: round(s["pre"][k], 4) for k in ("ES", "PS", "NS", "S") if k in s["pre"]},
            "edit_seconds": s.get("edit_seconds"),
            "seconds": round(time.time() - t1, 1),
        }
        print(f"τ {t}: {edits[str(t)]}", flush=True)
    res = {
        "model": args.model,
        "data": str(Path(args.data).relative_to(ROOT)) if Path(args.data).is_relative_to(ROOT) else args.data,
        "n_stored": len(edit),
        "n_probes": {"paraphrase": len(para), "neighbourhood": len(neigh), "unrelated": len(other)},
        "background_prompts": len(BACKGROUND),
        "default_layer": default_layer,
        "layers": layers,
        "quantiles": Q,
        "seconds": round(time.time() - t0, 1),
        "suggested": suggested,
        "sequential_edits": {"n": args.edits if edits else 0, "by_tau": edits},
        "rows": rows,
    }
    print(f"\n{args.model}: {len(edit)} stored edit masks; best overlap quantiles (10/50/90 %)")
    print(f"{'layer':>5} {'feature':>16} {'k':>5}  {'para own':>17}  {'neigh best':>17}  {'unrel best':>17}")
    for r in rows:
        print(
            f"{r['layer']:>5} {r['prompt_feature']:>16} {r['k']:>5}  "
            + "  ".join(
                " ".join(f"{v:.2f}" for v in r[c]).rjust(17)
                for c in ("paraphrase_own", "neighbour_best", "unrelated_best")
            )
        )
    out = Path(args.out or ROOT / f"benchmarks/results/memoir_calibration_{args.model}.json")
    write_result(out, res, provenance=started)
    print(f"wrote {out} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
