"""Load test of ``loka serve``: concurrent completions with per-request artifact stacks, every answer checked.

    LOKA_THREADS=1 python benchmarks/serve_load.py                 # SmolLM2-135M, 64 requests, 8 clients
    python benchmarks/serve_load.py --model tiny-llama --n 16      # a quick run on a random tiny model

Starts ``loka serve`` in a subprocess on 127.0.0.1 (a free port, a temporary store), makes three ROME
artifacts through the API (a, b, and c), and computes in this process, with ``loka.generate``, the
greedy answer of every prompt under every stack a request can meet: the global stack (empty, or [c])
followed by the request's own (none, [a], [b], [a, b]). Then it measures

* **sequential**: one client, each prompt under each request stack in turn (no contention: the cost
  of switching stacks per request);
* **concurrent**: ``--n`` requests from ``--clients`` threads, request stacks cycling none / [a] / [b] /
  [a, b] (every eighth one streamed), while another thread applies and reverts c globally.

Every response must equal the answer precomputed for the stack it reports it ran under (``loka.artifacts``
in the response); a mismatch or an error counts as a failure. Latency is per request, client side
(waiting for the model's lock included); throughput is requests per second of the concurrent phase.
Loopback only, every request and the server's start bounded by timeouts; the server is stopped at the
end. Writes ``benchmarks/results/serve_load_<model>.json`` (stamped) and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import stamp, write_result

from loka.env import requested_threads

TOKEN = "serve-load"
#: the three edits: a and b are stacked per request, c is applied and reverted globally
EDITS = {
    "a": {"prompt": "{} is located in the city of", "subject": "Eiffel Tower", "target": "Rome"},
    "b": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target": "English"},
    "c": {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target": "tennis"},
}
PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Danielle Darrieux is",
    "Michael Jordan plays the sport of",
]
REQUEST_STACKS = [(), ("a",), ("b",), ("a", "b")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, store: Path, port: int, log: Path, timeout: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loka.cli", "-q", "serve", "--model", model, "--port", str(port)]
    cmd += ["--store", str(store), "--token", TOKEN]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"loka serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"loka serve did not answer within {timeout:.0f} s: {log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def expected_answers(model: str, store: Path, ids: dict[str, str], max_tokens: int) -> tuple[dict, dict]:
    """``{(effective stack ids, prompt): greedy text}`` from loka itself, and per request stack the median
    milliseconds of applying it and reverting it again (what a switch costs, 20 repeats)."""
    import loka

    handle = loka.load_model(model)
    arts = {k: loka.load_artifact(store / i) for k, i in ids.items()}
    switch_ms = {}
    for req in REQUEST_STACKS[1:]:
        times = []
        for _ in range(20):
            t = time.perf_counter()
            for k in req:
                arts[k].apply(handle)
            for k in reversed(req):
                arts[k].revert(handle)
            times.append(1000 * (time.perf_counter() - t))
        switch_ms["+".join(req)] = round(statistics.median(times), 3)
    out = {}
    for glob in ((), ("c",)):
        for req in REQUEST_STACKS:
            applied = [arts[k] for k in (*glob, *req)]
            for a in applied:
                a.apply(handle)
            try:
                texts = [loka.generate(handle, [p], max_tokens)[0] for p in PROMPTS]
            finally:
                for a in reversed(applied):
                    a.revert(handle)
            for p, t in zip(PROMPTS, texts):
                out[(tuple(ids[k] for k in (*glob, *req)), p)] = t
    return out, switch_ms


def ask(
    client: httpx.Client, prompt: str, stack: list[str], max_tokens: int, stream: bool
) -> tuple[str, list[str]]:
    """One completion: (text, the effective stack the server reports)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "artifacts": stack, "stream": stream}
    if not stream:
        r = client.post("/v1/completions", json=body)
        r.raise_for_status()
        d = r.json()
        return d["choices"][0]["text"], d["loka"]["artifacts"]
    text, eff = [], []
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                raise RuntimeError(d["error"]["message"])
            eff = d["loka"]["artifacts"]
            text.append(d["choices"][0]["text"])
    return "".join(text), eff


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def latency(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "p50_s": round(statistics.median(xs), 4),
        "p95_s": round(pct(xs, 0.95), 4),
        "max_s": round(max(xs), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model to serve (default smollm2-135m)")
    ap.add_argument("--n", type=int, default=64, help="requests in the concurrent phase (default 64)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens per completion (default 8)")
    ap.add_argument("--hparams", default="{}", help="JSON hyperparameters for the three ROME edits")
    ap.add_argument(
        "--timeout", type=float, default=600.0, help="seconds allowed per request and for the start"
    )
    ap.add_argument("--out", help="result file (default benchmarks/results/serve_load_<model>.json)")
    args = ap.parse_args()
    started = stamp(threads=requested_threads())
    out_path = Path(args.out or f"benchmarks/results/serve_load_{args.model}.json")
    hparams = json.loads(args.hparams)

    with tempfile.TemporaryDirectory(prefix="loka-serve-load-") as tmp:
        store, port = Path(tmp) / "store", free_port()
        t0 = time.perf_counter()
        proc = start_server(args.model, store, port, Path(tmp) / "server.log", args.timeout)
        start_s = time.perf_counter() - t0
        try:
            base = f"http://127.0.0.1:{port}"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            limits = httpx.Limits(max_connections=args.clients + 2)
            with httpx.Client(base_url=base, timeout=args.timeout, limits=limits) as client:
                ids, made = {}, {}
                for k, e in EDITS.items():
                    r = client.post(
                        "/v1/artifacts",
                        json={"method": "rome", "edit": [e], "hparams": hparams},
                        headers=auth,
                    )
                    if r.status_code != 201:
                        raise SystemExit(f"making artifact {k} failed: {r.text}")
                    d = r.json()
                    ids[k] = d["id"]
                    made[k] = {
                        "id": d["id"],
                        "edit": d["targets"][0],
                        "seconds": d["seconds"],
                        "p_target_before": d["report"][0]["before"]["p_target"],
                        "p_target_after": d["report"][0]["after"]["p_target"],
                    }
                    print(f"artifact {k}: {d['targets'][0]} {d['id']} in {d['seconds']:.1f} s", flush=True)
                expected, switch_ms = expected_answers(args.model, store, ids, args.max_tokens)
                distinct = len(set(expected.values()))
                print(f"{len(expected)} expected answers ({distinct} distinct)", flush=True)

                failures: list[dict] = []

                def check(prompt: str, req: tuple[str, ...], stream: bool) -> tuple[float, bool, list[str]]:
                    stack = [ids[k] for k in req]
                    t = time.perf_counter()
                    try:
                        text, eff = ask(client, prompt, stack, args.max_tokens, stream)
                    except Exception as e:  # counted, and the run goes on
                        failures.append(
                            {"prompt": prompt, "stack": stack, "error": f"{type(e).__name__}: {e}"}
                        )
                        return time.perf_counter() - t, False, []
                    dt = time.perf_counter() - t
                    want = expected.get((tuple(eff), prompt))
                    ok = want is not None and text == want and (not stack or eff[-len(stack) :] == stack)
                    if not ok:
                        failures.append(
                            {"prompt": prompt, "stack": stack, "effective": eff, "got": text, "want": want}
                        )
                    return dt, ok, eff

                check(PROMPTS[0], (), False)  # warm-up
                seq: dict[str, list[float]] = {"none": [], "per_request": []}
                for req, p in itertools.product(REQUEST_STACKS, PROMPTS):
                    for _ in range(2):
                        dt, _ok, _eff = check(p, req, False)
                        seq["per_request" if req else "none"].append(dt)

                stop = threading.Event()
                toggles = [0]

                def toggler() -> None:
                    rng = random.Random(0)
                    while not stop.is_set():
                        for verb in ("apply", "revert"):
                            r = client.post(f"/v1/artifacts/{ids['c']}/{verb}", headers=auth)
                            if r.status_code != 200:
                                failures.append({"global": verb, "status": r.status_code, "error": r.text})
                            toggles[0] += 1
                            stop.wait(rng.uniform(0.05, 0.3))

                jobs = [
                    (PROMPTS[i % len(PROMPTS)], REQUEST_STACKS[i % len(REQUEST_STACKS)], i % 8 == 7)
                    for i in range(args.n)
                ]
                tog = threading.Thread(target=toggler, daemon=True)
                t0 = time.perf_counter()
                tog.start()
                with ThreadPoolExecutor(args.clients) as pool:
                    results = list(pool.map(lambda j: (j, *check(*j)), jobs))
                wall = time.perf_counter() - t0
                stop.set()
                tog.join(timeout=args.timeout)
                final = client.get("/v1/stack").json()["stack"]
                if final:  # the toggler's last apply had no revert
                    client.post(f"/v1/artifacts/{ids['c']}/revert", headers=auth)
        finally:
            stop_server(proc)

    conc = {
        "none": [dt for (_, req, _), dt, _, _ in results if not req],
        "per_request": [dt for (_, req, _), dt, _, _ in results if req],
    }
    payload = {
        "model": args.model,
        "n": args.n,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "prompts": PROMPTS,
        "artifacts": made,
        "expected_answers": len(expected),
        "distinct_expected_answers": distinct,
        "server_start_s": round(start_s, 2),
        "apply_and_revert_ms": switch_ms,
        "sequential": {k: latency(v) for k, v in seq.items()},
        "concurrent": {
            **{k: latency(v) for k, v in conc.items()},
            "all": latency([dt for _, dt, _, _ in results]),
            "wall_s": round(wall, 3),
            "throughput_rps": round(args.n / wall, 3),
            "streamed": sum(1 for (_, _, s), _, _, _ in results if s),
            "global_toggles": toggles[0],
            "under_global_c": sum(1 for *_, eff in results if ids["c"] in eff),
        },
        "failures": len(failures),
        "failure_examples": failures[:5],
    }
    path = write_result(out_path, payload, provenance=started)
    c = payload["concurrent"]
    print(json.dumps({k: payload[k] for k in ("sequential", "concurrent", "failures")}, indent=2))
    print(
        f"{args.n} requests, {args.clients} clients: {c['throughput_rps']} req/s, {len(failures)} failure(s) -> {path}"
    )
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
