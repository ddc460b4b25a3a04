"""GRACE's radius: how far paraphrase and neighbourhood keys lie from an edit's key (relative to its norm).

    python benchmarks/grace_radius.py --model smollm2-135m --n 40

Keys are the inputs of GRACE's matrix at the last prompt token. A radius that reaches paraphrases
but not neighbours exists only if paraphrases sit closer; prints quantiles and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _stamp import stamp, write_result

import loka
from loka.forgetting import losses as L
from loka.methods.grace import _io_at_answer_positions
from loka.requests import read_requests

Q = [0.1, 0.5, 0.9]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/generated/cf_smollm2.json")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    h = loka.load_model(args.model)
    started = stamp()
    layer = loka.default_hparams("grace", h).layer
    reqs = read_requests(args.data)[: args.n]

    def keys(texts: list[str]) -> torch.Tensor:  # one row per text: its last prompt token (1-token answer)
        return torch.cat(
            [_io_at_answer_positions(h, layer, L.qa_batch(h.tokenizer, [t], ["x"]))[0][:1] for t in texts]
        )

    K = keys([r.text for r in reqs])
    norm = K.norm(dim=1)
    D = torch.cdist(K, K) / norm[:, None]
    D.fill_diagonal_(float("inf"))
    rows = {
        "paraphrase": ((keys([r.paraphrases[0] for r in reqs]) - K).norm(dim=1) / norm),
        "neighbourhood": ((keys([r.neighborhood[0] for r in reqs]) - K).norm(dim=1) / norm),
        "nearest other edit": D.min(1).values,
    }
    res = {
        "model": args.model,
        "layer": layer,
        "n": len(reqs),
        "key_norm_median": float(norm.median()),
        "quantiles": Q,
        "rows": {k: [round(float(x), 3) for x in v.quantile(torch.tensor(Q))] for k, v in rows.items()},
    }
    print(f"\n{args.model}, layer {layer}, {len(reqs)} records: distance / ‖edit key‖ (10 / 50 / 90 %)")
    for k, v in res["rows"].items():
        print(f"{k:20s} " + " ".join(f"{x:6.3f}" for x in v))
    out = Path(args.out or f"benchmarks/results/grace_radius_{args.model}.json")
    write_result(out, res, provenance=started)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
