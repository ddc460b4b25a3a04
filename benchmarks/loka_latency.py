"""LOKA inference overhead: router + retrieval + plug against the plain model (SmolLM2, CPU).

    python benchmarks/loka_latency.py --artifact out/loka_in.loka

Times, per query batch: a forward pass of the prompts (prefill), and greedy generation of
``--new-tokens`` tokens, on the plain model and with the codebook applied (each row routed at the
prefill: MiniLM router, embedding, nearest memory, plug), the two timed in alternation. The codebook is a saved LOKA artifact
(``loka update --method loka ... --save``), or one trained here for ``--train-n`` edits + as many
forgets (+ half as many retained facts) from ``cf_lifelong.json`` — the issue's 100 + 100 training-time
target, timed and reported.
Prints a table and writes ``benchmarks/results/loka_latency_<model>.json``. Timing a saved codebook
keeps the training time of the file's earlier run; that block carries the provenance of the run that
measured it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _stamp import stamp, write_result

import loka
from loka.cli.common import parse_overrides


def _paired(fn, art, h, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` on the plain model and with ``art`` applied, the two timed in
    alternation (one of each per repeat), so that the machine's drift from minute to minute falls on
    both alike; applying and reverting the codebook (hooks only) is outside the timed calls."""
    fn()  # warm-up, both ways
    art.apply(h)
    try:
        fn()
    finally:
        art.revert(h)
    plain, with_art = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        plain.append(time.perf_counter() - t)
        art.apply(h)
        try:
            t = time.perf_counter()
            fn()
            with_art.append(time.perf_counter() - t)
        finally:
            art.revert(h)
    return statistics.median(plain), statistics.median(with_art)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--artifact", help="a LOKA codebook artifact (default: train one on a small known-facts task)"
    )
    ap.add_argument("--data", default="data/generated/cf_smollm2.json", help="prompts to time")
    ap.add_argument("--train-data", default="data/generated/cf_lifelong.json")
    ap.add_argument("--train-n", type=int, default=100, help="edits and forgets in the timed codebook")
    ap.add_argument("--save", help="save the trained codebook here")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    h = loka.load_model(args.model)
    started = stamp()
    records = json.loads(Path(args.data).read_text())
    train = {}
    if args.artifact:
        art = loka.load_artifact(args.artifact)
    else:  # the speed target: a codebook for N edits + N forgets (+ retain), timed
        from loka.requests import ForgetRequest, RetainRequest, request_from_record

        pool = json.loads(Path(args.train_data).read_text())
        n = args.train_n
        edits = [request_from_record(r, f"cf[{i}]") for i, r in enumerate(pool[:n])]
        forget = [request_from_record(r, f"cf[{i}]", ForgetRequest) for i, r in enumerate(pool[n : 2 * n])]
        retain = [
            RetainRequest(
                r["requested_rewrite"]["prompt"],
                r["requested_rewrite"]["subject"],
                r["requested_rewrite"]["target_true"]["str"],
            )
            for r in pool[2 * n : 2 * n + n // 2]
        ]
        over = parse_overrides(args.set)
        t = time.time()
        with torch.enable_grad():
            art = loka.update(h, edits, forget, retain, method="loka", hparams=over or None, apply=False)
        train = {
            "edits": len(edits),
            "forgets": len(forget),
            "retain": len(retain),
            "seconds": round(time.time() - t, 1),
            "provenance": started,
        }
        print(
            f"trained a codebook for {len(edits)} edits + {len(forget)} forgets ({len(retain)} retain) in "
            f"{train['seconds']:.0f}s: {len(art.manifest['extra']['memories'])} memories",
            flush=True,
        )
        if args.save:
            art.save(args.save)
    prompts = [
        r["requested_rewrite"]["prompt"].replace("{}", r["requested_rewrite"]["subject"]) for r in records
    ]
    tok = h.tokenizer
    tok.padding_side = "left"
    rows = []
    for b in args.batch:
        enc = tok(prompts[:b], return_tensors="pt", padding=True)

        def forward(enc=enc):
            h.model(**enc, use_cache=False)

        def gen(enc=enc):
            h.model.generate(
                **enc, do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id
            )

        base_f, loka_f = _paired(forward, art, h, args.repeats)
        base_g, loka_g = _paired(gen, art, h, args.repeats)
        rows.append(
            {
                "batch": b,
                "forward_ms": round(base_f * 1e3, 1),
                "forward_loka_ms": round(loka_f * 1e3, 1),
                "forward_overhead": round(loka_f / base_f - 1, 3),
                "generate_ms": round(base_g * 1e3, 1),
                "generate_loka_ms": round(loka_g * 1e3, 1),
                "generate_overhead": round(loka_g / base_g - 1, 3),
            }
        )
    x = art.manifest["extra"]
    res = {
        "model": args.model,
        "train": train,
        "memories": len(x["memories"]),
        "key_source": x.get("key_source", "llm"),
        "router": x.get("router") is not None,
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    out = Path(args.out or f"benchmarks/results/loka_latency_{args.model}.json")
    if not train and out.exists():  # timing a saved codebook: keep the training time measured with it
        res["train"] = json.loads(out.read_text()).get("train", {})
    write_result(out, res, provenance=started)
    print(
        f"| batch | forward ms | + LOKA ms | overhead | generate {args.new_tokens} ms | + LOKA ms | overhead |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['forward_ms']} | {r['forward_loka_ms']} | {r['forward_overhead']:+.1%} | "
            f"{r['generate_ms']} | {r['generate_loka_ms']} | {r['generate_overhead']:+.1%} |"
        )


if __name__ == "__main__":
    main()
