"""Start-up time of the command line, as a ratio to ``python -c "import torch"``.

    python benchmarks/startup.py --repeats 9

Each command runs as a fresh process; the commands alternate round by round (so drift hits all alike)
and the table gives each one's median wall time and its ratio to the median torch import of the same
rounds. Target: every command <= 1.5x the torch import.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import write_result

BIN = Path(sys.executable).parent
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "loka --help": [str(BIN / "loka"), "--help"],
    "loka models": [str(BIN / "loka"), "models"],
    "loka edit --help": [str(BIN / "loka"), "edit", "--help"],
    "loka unlearn --help": [str(BIN / "loka"), "unlearn", "--help"],
    "loka eval --help": [str(BIN / "loka"), "eval", "--help"],
    "loka kg run --help": [str(BIN / "loka"), "kg", "run", "--help"],
}
TARGET = 1.5


def run_once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9, help="rounds (each runs every command once)")
    ap.add_argument("--out", default="benchmarks/results/startup.json", help="result JSON")
    args = ap.parse_args()
    for cmd in COMMANDS.values():  # warm the page cache once
        run_once(cmd)
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            times[name].append(run_once(cmd))
    base = statistics.median(times["import torch"])
    rows = []
    print(f"{'command':22s} {'median s':>9s} {'ratio':>6s}  target <= {TARGET}x")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base
        rows.append(
            {
                "command": name,
                "median_s": round(med, 4),
                "ratio_to_torch_import": round(ratio, 3),
                "runs_s": [round(t, 4) for t in ts],
            }
        )
        ok = "" if name == "import torch" else ("ok" if ratio <= TARGET else "OVER")
        print(f"{name:22s} {med:9.3f} {ratio:6.2f}  {ok}")
    path = write_result(args.out, {"target_ratio": TARGET, "repeats": args.repeats, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
