"""Fault injection: loka used as a hostile and careless user would, every outcome classified.

    python benchmarks/fault_injection.py            # about 10 minutes on 2 cores
    python benchmarks/fault_injection.py --quick    # one case of each family

Each case runs the CLI (or a short Python snippet) in a fresh process on tiny models, with a time
limit, and is classified as:

* clear error — exit status 2 and one line starting with ``error:`` (or, where success is right, a
  verified success);
* traceback — a Python traceback, or an exit status other than 0/2;
* silent — exit 0 where loka must refuse, or a result that fails its check (an artifact saved from a
  diverged update, a model changed);
* hang — the time limit ran out;
* data lost — a file or folder the case protects (the user's own) changed or vanished.

Families: bad input files for every command that reads one; output paths loka must not write;
hyperparameters outside their domain; diverged updates; tampered artifacts, sessions and states;
malformed requests; kill -9 during saves, overwrites and statistics; concurrent writers and readers.
Target: 0 tracebacks, 0 silent, 0 hangs, 0 data lost. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import stamp, write_result

LOKA = [sys.executable, "-m", "loka.cli"]
TIMEOUT = 120


@dataclass
class Case:
    family: str
    name: str
    argv: list[str] | None = None  # loka CLI arguments
    code: str | None = None  # or a Python snippet (exit 0: fine, 2: refused, other: bug)
    expect: str = "error"  # "error": must refuse; "ok": must succeed
    protect: list[Path] = field(default_factory=list)  # the user's files: must not change
    check: Callable[[], str | None] | None = None  # returns a problem, or None
    timeout: int = TIMEOUT


def snapshot(paths: list[Path]) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for p in paths:
        if p.is_file():
            out[str(p)] = p.read_bytes()
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                out[str(f)] = f.read_bytes() if f.is_file() else b"<dir>"
            out[str(p)] = b"<dir>"
        else:
            out[str(p)] = None
    return out


def run_case(c: Case, env: dict) -> dict:
    before = snapshot(c.protect)
    cmd = [*LOKA, *c.argv] if c.argv is not None else [sys.executable, "-c", c.code]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=c.timeout, env=env)
        code, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired:
        return {"family": c.family, "case": c.name, "outcome": "hang", "seconds": round(time.time() - t0, 1)}
    seconds = round(time.time() - t0, 1)
    lost = snapshot(c.protect) != before
    lines = [x for x in err.strip().splitlines() if x.strip() and not x.startswith(("WARNING", "INFO"))]
    problem = c.check() if c.check is not None else None
    if lost:
        outcome = "data lost"
    elif "Traceback" in err or code not in (0, 2):
        outcome = "traceback"
    elif (c.expect == "error" and code == 0) or (c.expect == "ok" and code != 0) or problem:
        outcome = "silent"
    elif c.expect == "error" and not (lines and lines[-1].startswith("error: ")):
        outcome = "traceback"  # refused, but not with one clear line
    else:
        outcome = "clear error" if c.expect == "error" else "ok"
    row = {"family": c.family, "case": c.name, "outcome": outcome, "exit": code, "seconds": seconds}
    if outcome not in ("clear error", "ok"):
        row["detail"] = (problem or err.strip()[-400:]) if not lost else "protected files changed"
    elif lines:
        row["message"] = lines[-1][:200]
    return row


# -- the cases -----------------------------------------------------------------------------------------
def build_cases(root: Path, quick: bool) -> list[Case]:
    w = root / "work"
    w.mkdir()
    cases: list[Case] = []
    good_edit = w / "edit.jsonl"
    good_edit.write_text(json.dumps({"prompt": "{} lives in", "subject": "Alice", "target_new": "Q"}) + "\n")
    forget = w / "forget.jsonl"
    forget.write_text(json.dumps({"prompt": "{} was born in", "subject": "Alice", "target_true": "Q"}) + "\n")
    retain = w / "retain.jsonl"
    retain.write_text(json.dumps({"prompt": "{} lives in", "subject": "Bob", "target_new": "R"}) + "\n")
    art = w / "good.loka"
    subprocess.run(
        [
            *LOKA,
            "edit",
            "--model",
            "tiny-llama",
            "--requests",
            str(good_edit),
            "--set",
            "v_steps=3",
            "--save",
            str(art),
            "--json",
        ],
        check=True,
        capture_output=True,
    )

    # bad input files
    bad: dict[str, Path] = {}
    bad["missing"] = w / "missing.json"
    bad["folder"] = w / "a-folder"
    bad["folder"].mkdir()
    bad["not utf-8"] = w / "latin1.json"
    bad["not utf-8"].write_bytes(b'{"prompt": "caf\xe9 {}"}')
    bad["invalid json"] = w / "broken.json"
    bad["invalid json"].write_text('{"prompt": ')
    bad["deep json"] = w / "deep.json"
    bad["deep json"].write_text("[" * 100000 + "]" * 100000)
    bad["empty"] = w / "empty.json"
    bad["empty"].write_text("")
    bad["fifo"] = w / "pipe.json"
    os.mkfifo(bad["fifo"])
    bad["link to /dev/zero"] = w / "zero.json"
    os.symlink("/dev/zero", bad["link to /dev/zero"])
    inputs = {
        "edit --requests": lambda p: ["edit", "--model", "tiny-llama", "--requests", p],
        "edit --hparams": lambda p: [
            "edit",
            "--model",
            "tiny-llama",
            "--requests",
            str(good_edit),
            "--hparams",
            p,
        ],
        "unlearn --forget": lambda p: ["unlearn", "--model", "tiny-llama", "--forget", p],
        "unlearn --retain": lambda p: [
            "unlearn",
            "--model",
            "tiny-llama",
            "--forget",
            str(forget),
            "--retain",
            p,
        ],
        "update --edit": lambda p: ["update", "--model", "tiny-llama", "--edit", p],
        "eval --data": lambda p: [
            "eval",
            "--model",
            "tiny-llama",
            "--data",
            p,
            "--out",
            str(w / "ev-unused"),
        ],
        "inspect": lambda p: ["inspect", p],
        "generate --artifact": lambda p: ["generate", "--model", "tiny-llama", "--artifact", p, "hello"],
        "kg stats --graph": lambda p: ["kg", "stats", "--graph", p],
        "data tasks --from": lambda p: ["data", "tasks", "--from", p, "--out", str(w / "tasks-unused")],
        "finetune --data": lambda p: [
            "finetune",
            "--model",
            "tiny-llama",
            "--data",
            p,
            "--out",
            str(w / "ft-unused"),
        ],
        "report": lambda p: ["report", p, "--out", str(w / "r.html")],
        "stats --corpus": lambda p: ["stats", "--model", "tiny-llama", "--layers", "1", "--corpus", p],
    }
    for cmd, argv in inputs.items():
        for kind, path in bad.items():
            if quick and kind != "missing":
                continue
            if cmd == "stats --corpus" and kind in ("folder",):  # a folder is a datasets corpus
                continue
            timeout = 60 if kind in ("fifo", "link to /dev/zero") else TIMEOUT
            cases.append(Case("bad input", f"{cmd}: {kind}", argv(str(path)), timeout=timeout))

    # output paths loka must not write
    def foreign(name: str, git: bool = False) -> Path:
        d = w / "outs" / name
        (d / "sub").mkdir(parents=True)
        (d / "thesis.txt").write_text("precious")
        if git:
            (d / ".git").mkdir()
            (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        return d

    def a_file(name: str) -> Path:
        f = w / "outs" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("mine")
        return f

    session = w / "session"
    subprocess.run(
        [
            *LOKA,
            "edit",
            "--model",
            "tiny-llama",
            "--requests",
            str(good_edit),
            "--set",
            "v_steps=2",
            "--state",
            str(session),
        ],
        check=True,
        capture_output=True,
    )
    writers = {
        "edit --save": lambda p, f: [
            "edit",
            "--model",
            "tiny-llama",
            "--requests",
            str(good_edit),
            "--set",
            "v_steps=2",
            "--save",
            p,
            *f,
        ],
        "unlearn --save": lambda p, f: [
            "unlearn",
            "--model",
            "tiny-llama",
            "--forget",
            str(forget),
            "--set",
            "max_steps=2",
            "--save",
            p,
            *f,
        ],
        "update --save": lambda p, f: [
            "update",
            "--model",
            "tiny-llama",
            "--method",
            "gd",
            "--edit",
            str(good_edit),
            "--forget",
            str(forget),
            "--set",
            "max_steps=2",
            "--save",
            p,
            *f,
        ],
        "apply --out": lambda p, f: [
            "apply",
            "--model",
            "tiny-llama",
            "--artifact",
            str(art),
            "--out",
            p,
            *f,
        ],
        "session --export": lambda p, f: ["session", str(session), "--export", p, *f],
        "eval --out": lambda p, f: [
            "eval",
            "--model",
            "tiny-llama",
            "--method",
            "none",
            "--data",
            str(Path(__file__).resolve().parents[1] / "data" / "counterfact_sample5.json"),
            "--n",
            "1",
            "--no-guard",
            "--out",
            p,
            *f,
        ],
    }
    for cmd, argv in writers.items():
        slug = cmd.replace(" ", "").replace("-", "")
        targets = {
            "a foreign folder": (foreign(f"{slug}-plain"), []),
            "a foreign folder, --force": (foreign(f"{slug}-force"), ["--force"]),
            "a git working tree, --force": (foreign(f"{slug}-git", git=True), ["--force"]),
            "an existing file, --force": (a_file(f"{slug}-file"), ["--force"]),
        }
        for kind, (path, flags) in targets.items():
            if quick and kind != "a foreign folder":
                continue
            cases.append(Case("output path", f"{cmd}: {kind}", argv(str(path), flags), protect=[path]))

    # hyperparameters outside their domain
    hps = [
        ("rome", "clamp_norm_factor=NaN"),
        ("rome", "clamp_norm_factor=-1"),
        ("rome", "v_steps=0"),
        ("rome", "v_lr=-1"),
        ("rome", "mom2_n_tokens=0"),
        ("rome", "context_length=-1"),
        ("rome", "v_batch_size=0"),
        ("rome", "v_dtype=float8"),
        ("rome", "layer=-1"),
        ("rome", "layer=99"),
        ("rome", "nonsense=1"),
        ("memit", "layers=[1,1]"),
        ("memit", "layers=[2,1]"),
        ("memit", "layers=[]"),
        ("memit", "layers=7"),
        ("alphaedit", "nullspace_threshold=0"),
        ("npo", "lr=0"),
        ("npo", "beta=-1"),
        ("grace", "eps=0"),
        ("wise", "mask_ratio=2"),
        ("loka", "mapping=hash"),
        ("lora", "rank=0"),
        ("scr", "k=0"),
    ]
    for method, kv in hps[: 2 if quick else None]:
        cases.append(
            Case(
                "hyperparameter",
                f"{method} {kv}",
                [
                    "edit",
                    "--model",
                    "tiny-llama",
                    "--method",
                    method,
                    "--requests",
                    str(good_edit),
                    "--set",
                    kv,
                ],
            )
        )

    # diverged updates: refused, nothing saved
    diverge = [
        ("gd", ["lr=1e37"]),
        ("gd", ["alpha=1e38"]),
        ("npo", ["lr=1e30"]),
        ("simnpo", ["lr=1e30"]),
        ("ga", ["lr=1e30"]),
        ("lora", ["lr=1e30"]),
        ("idk", ["lr=1e30"]),
        ("relearn", ["lr=1e30"]),
    ]
    for method, sets in diverge[: 1 if quick else None]:
        out = w / "diverged" / f"{method}-{sets[0]}.loka"
        argv = [
            "unlearn",
            "--model",
            "tiny-llama",
            "--method",
            method,
            "--forget",
            str(forget),
            "--retain",
            str(retain),
            "--set",
            "stop_forget_em=-1",
            *[x for s in sets for x in ("--set", s)],
            "--save",
            str(out),
        ]
        cases.append(
            Case(
                "diverged update",
                f"{method} {' '.join(sets)}",
                argv,
                check=lambda out=out: "an artifact was saved" if out.exists() else None,
            )
        )

    # tampered artifacts
    tamper = {
        "model removed": lambda m: m.pop("model"),
        "shape changed": lambda m: next(iter(m["params"].values())).update(shape=[1, 1]),
        "dtype changed": lambda m: next(iter(m["params"].values())).update(dtype="float16"),
        "id copied": lambda m: m.update(id="0123456789abcdef"),
        "format_version '2'": lambda m: m.update(format_version="2"),
        "format_version 99": lambda m: m.update(format_version=99),
        "hparams edited": lambda m: m["hparams"].update(v_steps=999),
        "requests edited": lambda m: m.update(requests=[]),
        "not an object": lambda m: m.clear(),
        "tensors_sha256 removed": lambda m: m.pop("tensors_sha256"),
    }
    for name, fn in list(tamper.items())[: 1 if quick else None]:
        p = w / "tampered" / f"{name.replace(' ', '_')}.loka"
        shutil.copytree(art, p)
        m = json.loads((p / "manifest.json").read_text())
        fn(m)
        (p / "manifest.json").write_text(json.dumps(m) if m else "[]")
        cases.append(Case("integrity", f"manifest {name}", ["inspect", str(p)]))
    for name, mutate in {
        "deltas truncated": lambda f: f.write_bytes(f.read_bytes()[:100]),
        "deltas flipped": lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]),
    }.items():
        p = w / "tampered" / f"{name.replace(' ', '_')}.loka"
        shutil.copytree(art, p)
        mutate(p / "deltas.safetensors")
        cases.append(
            Case("integrity", name, ["generate", "--model", "tiny-llama", "--artifact", str(p), "x"])
        )
    stack_code = textwrap.dedent(
        f"""
        import sys, loka
        from loka.cli import main
        h = loka.load_model("tiny-llama")
        a = loka.load_artifact({str(art)!r}).apply(h)
        try:
            loka.stack_artifacts([a, a]).apply(h)
        except loka.LokaError as e:
            print("error:", e, file=sys.stderr); sys.exit(2)
        """
    )
    cases.append(Case("integrity", "stack applied while a part is applied", code=stack_code))
    for name, fn in {
        "batch replaced by another artifact": lambda s: (
            shutil.rmtree(s / "batches" / "batch_00000.loka"),
            shutil.copytree(w / "other.loka", s / "batches" / "batch_00000.loka"),
        ),
        "state.json edited": lambda s: (s / "state" / "state.json").write_text(
            json.dumps({**json.loads((s / "state" / "state.json").read_text()), "meta": {"batches": 7}})
        ),
        "session.json incomplete": lambda s: (s / "session.json").write_text('{"format": "loka-session"}'),
        "session.json invalid": lambda s: (s / "session.json").write_text("{"),
        "batch index with a gap": lambda s: (s / "batches.json").write_text(
            json.dumps({"format": "loka-batches", "next": 1, "batches": [{"n": 1, "id": "x"}]})
        ),
    }.items():
        if quick and not name.startswith("batch replaced"):
            continue
        s = w / "sessions" / name.replace(" ", "_")
        shutil.copytree(session, s)
        if not (w / "other.loka").exists():
            subprocess.run(
                [
                    *LOKA,
                    "edit",
                    "--model",
                    "tiny-llama",
                    "--prompt",
                    "{} works as",
                    "--subject",
                    "Carl",
                    "--target",
                    "Z",
                    "--set",
                    "v_steps=2",
                    "--save",
                    str(w / "other.loka"),
                ],
                check=True,
                capture_output=True,
            )
        fn(s)
        cases.append(Case("integrity", f"session {name}", ["session", str(s)]))

    # malformed requests and prompts
    reqs = {
        "paraphrases is an object": {
            "prompt": "{} x",
            "subject": "B",
            "target_new": "Q",
            "paraphrases": {"a": 1},
        },
        "paraphrases is a number": {"prompt": "{} x", "subject": "B", "target_new": "Q", "paraphrases": 7},
        "requested_rewrite null": {"requested_rewrite": None},
        "no {} in prompt": {"prompt": "x", "subject": "B", "target_new": "Q"},
        "subject is blank": {"prompt": "{} lives in", "subject": "   ", "target_new": "Q"},
        "prompt longer than the model": {"prompt": "word " * 3000 + "{}", "subject": "B", "target_new": "Q"},
        "target is a number": {"prompt": "{} x", "subject": "B", "target_new": 3},
        "unknown field": {"prompt": "{} x", "subject": "B", "target_new": "Q", "colour": "red"},
    }
    for name, rec in list(reqs.items())[: 1 if quick else None]:
        f = w / "requests" / f"{name.replace(' ', '_')}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(rec))
        cases.append(Case("request", name, ["edit", "--model", "tiny-llama", "--requests", str(f)]))
    for flag in ("--subject", "--target"):
        argv = ["edit", "--model", "tiny-llama", "--prompt", "{} lives in", "--subject", "A", "--target", "Q"]
        argv[argv.index(flag) + 1] = ""
        cases.append(Case("request", f"empty {flag}", argv))
    cases.append(
        Case(
            "request",
            "braces in a prompt (wise)",
            [
                "edit",
                "--model",
                "tiny-llama",
                "--method",
                "wise",
                "--prompt",
                "{} said {hello} in",
                "--subject",
                "Bob",
                "--target",
                "Q",
                "--set",
                "n_iter=2",
                "--layer",
                "1",
            ],
            expect="ok",
        )
    )
    cases.append(Case("request", "--rollback is ambiguous", ["session", str(session), "--rollback", "1"]))
    cases.append(
        Case(
            "request",
            "rollback without --yes",
            ["session", str(session), "--rollback-last", "1"],
            protect=[session],
        )
    )
    return cases


# -- kill -9 and concurrency loops -------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys
    from loka.artifact import load_artifact
    a, b = load_artifact(sys.argv[1]), load_artifact(sys.argv[2])
    print("ready", flush=True)
    i = 0
    while True:
        (a if i % 2 else b).save(sys.argv[3], force=True)
        i += 1
    """
)
STATS = textwrap.dedent(
    """
    import sys, pathlib, loka
    from loka.corpus import JsonlCorpus
    h = loka.load_model("tiny-llama")
    print("ready", flush=True)
    loka.second_moments(h, [1, 2], JsonlCorpus(pathlib.Path(sys.argv[1])), 6000, batch_size=4,
                        checkpoint_every=2, progress=False)
    """
)


def kill_loops(root: Path, env: dict, n_save: int, n_stats: int) -> list[dict]:
    from loka.artifact import load_artifact

    rows = []
    w = root / "kill"
    w.mkdir()
    a = root / "work" / "good.loka"
    b = root / "work" / "other.loka"
    target = w / "x.loka"
    shutil.copytree(a, target)
    ids = {load_artifact(a).id, load_artifact(b).id}
    rng = random.Random(0)
    for i in range(n_save):
        p = subprocess.Popen(
            [*LOKA[:1], "-c", WRITER, str(a), str(b), str(target)], stdout=subprocess.PIPE, text=True, env=env
        )
        p.stdout.readline()
        time.sleep(rng.uniform(0.02, 0.8))
        p.kill()
        p.wait()
        try:
            ok = load_artifact(target).id in ids
            outcome = "clear error" if ok else "silent"
            detail = None if ok else "the path holds an artifact that was never saved there"
        except Exception as e:  # any failure here is lost data
            outcome, detail = "data lost", f"no complete artifact at the path after the kill: {e}"
        row = {"family": "kill -9", "case": f"overwrite loop, kill {i + 1}", "outcome": outcome}
        if detail:
            row["detail"] = detail
        rows.append(row)
    load_artifact(a).save(target, force=True)
    litter = [p for p in os.listdir(w) if p != "x.loka"]
    rows.append(
        {
            "family": "kill -9",
            "case": "temporary files after the next save",
            "outcome": "clear error" if not litter else "silent",
            **({"detail": f"left: {litter}"} if litter else {}),
        }
    )
    corpus = root / "work" / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": f"Sentence number {i} says the cat sat on mat {i % 7}."}) + "\n"
            for i in range(2000)
        )
    )
    senv = {**env, "LOKA_HOME": str(w / "home")}
    for i in range(n_stats):
        p = subprocess.Popen(
            [*LOKA[:1], "-c", STATS, str(corpus)], stdout=subprocess.PIPE, text=True, env=senv
        )
        p.stdout.readline()
        time.sleep(rng.uniform(0.2, 1.5))
        p.kill()
        p.wait()
        check = subprocess.run(
            [*LOKA[:1], "-c", STATS.replace('print("ready", flush=True)', ""), str(corpus)],
            capture_output=True,
            text=True,
            env=senv,
            timeout=300,
        )
        bad = [f for f in (w / "home").rglob("*loka-tmp*")]
        outcome = (
            "clear error"
            if check.returncode == 0 and not bad
            else "traceback"
            if "Traceback" in check.stderr
            else "silent"
        )
        rows.append(
            {
                "family": "kill -9",
                "case": f"statistics, kill {i + 1}",
                "outcome": outcome,
                **({"detail": check.stderr[-300:] or str(bad)} if outcome != "clear error" else {}),
            }
        )
        shutil.rmtree(w / "home" / "stats", ignore_errors=True)
    return rows


READER = textwrap.dedent(
    """
    import sys, time
    from loka.artifact import load_artifact
    from loka.errors import LokaError
    ok = bad = 0
    t = time.time()
    while time.time() - t < float(sys.argv[2]):
        try:
            load_artifact(sys.argv[1]); ok += 1
        except LokaError:
            bad += 1
    print(ok, bad)
    """
)
SAVER = textwrap.dedent(
    """
    import sys, time
    from loka.artifact import load_artifact
    a = load_artifact(sys.argv[1])
    n = fail = 0
    t = time.time()
    while time.time() - t < float(sys.argv[3]):
        try:
            a.save(sys.argv[2], force=True); n += 1
        except Exception as e:
            fail += 1; print(type(e).__name__, e, file=sys.stderr)
    print(n, fail)
    """
)


def concurrency_loops(root: Path, env: dict, rounds: int, seconds: float) -> list[dict]:
    rows = []
    a, b = root / "work" / "good.loka", root / "work" / "other.loka"
    for i in range(rounds):
        target = root / "conc" / f"shared{i}.loka"
        target.parent.mkdir(exist_ok=True)
        shutil.copytree(a, target)
        procs = [
            subprocess.Popen(
                [*LOKA[:1], "-c", SAVER, str(src), str(target), str(seconds)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for src in (a, b)
        ]
        reader = subprocess.Popen(
            [*LOKA[:1], "-c", READER, str(target), str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        saves = fails = 0
        for p in procs:
            out, _ = p.communicate(timeout=300)
            n, f = map(int, out.split())
            saves, fails = saves + n, fails + f
        out, _ = reader.communicate(timeout=300)
        ok, bad = map(int, out.split())
        outcome = "clear error" if fails == 0 and bad == 0 else "silent"
        rows.append(
            {
                "family": "concurrency",
                "case": f"2 writers + 1 reader, round {i + 1}",
                "outcome": outcome,
                "saves": saves,
                "save_failures": fails,
                "loads": ok,
                "bad_loads": bad,
            }
        )
    return rows


OUTCOMES = ("clear error", "ok", "traceback", "silent", "hang", "data lost")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one case of each kind (a smoke run)")
    ap.add_argument("--kills", type=int, default=25, help="kill -9 rounds during artifact overwrites")
    ap.add_argument("--stats-kills", type=int, default=5, help="kill -9 rounds during statistics")
    ap.add_argument("--concurrency-rounds", type=int, default=3, help="rounds of 2 writers + 1 reader")
    ap.add_argument("--out", default="benchmarks/results/fault_injection.json", help="result JSON")
    args = ap.parse_args()
    started = stamp(threads=1)
    root = Path(tempfile.mkdtemp(prefix="loka-faults-"))
    env = {**os.environ, "LOKA_HOME": str(root / "home"), "LOKA_THREADS": "1"}
    os.environ.update(env)
    t0 = time.time()
    try:
        cases = build_cases(root, args.quick)
        rows = []
        for i, c in enumerate(cases, 1):
            rows.append(run_case(c, env))
            print(
                f"[{i}/{len(cases)}] {c.family}: {c.name} -> {rows[-1]['outcome']}",
                file=sys.stderr,
                flush=True,
            )
        q = args.quick
        rows += kill_loops(root, env, 2 if q else args.kills, 1 if q else args.stats_kills)
        rows += concurrency_loops(root, env, 1 if q else args.concurrency_rounds, 3.0 if q else 8.0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    counts = Counter(r["outcome"] for r in rows)
    fams = sorted({r["family"] for r in rows})
    print(f"\n{'family':18s} {'cases':>5s} " + " ".join(f"{o:>11s}" for o in OUTCOMES))
    for f in fams:
        fc = Counter(r["outcome"] for r in rows if r["family"] == f)
        print(f"{f:18s} {sum(fc.values()):5d} " + " ".join(f"{fc[o]:11d}" for o in OUTCOMES))
    print(f"{'all':18s} {len(rows):5d} " + " ".join(f"{counts[o]:11d}" for o in OUTCOMES))
    for r in rows:
        if r["outcome"] not in ("clear error", "ok"):
            print(f"  {r['outcome']}: {r['family']}: {r['case']}: {r.get('detail', '')[:300]}")
    summary = {o: counts[o] for o in OUTCOMES}
    print(
        f"cases {len(rows)}; clear errors {counts['clear error']}, verified successes {counts['ok']}, "
        f"tracebacks {counts['traceback']}, silent {counts['silent']}, hangs {counts['hang']}, "
        f"data lost {counts['data lost']} ({time.time() - t0:.0f} s)"
    )
    path = write_result(
        args.out,
        {"quick": args.quick, "cases": len(rows), "summary": summary, "rows": rows},
        provenance=started,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
