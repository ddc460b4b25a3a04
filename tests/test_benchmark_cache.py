"""The mini-TOFU benchmark reuses saved evaluations only when their content key matches."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mini_tofu():
    spec = importlib.util.spec_from_file_location("mini_tofu_bench", ROOT / "benchmarks" / "mini_tofu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cached_evaluation_is_keyed_by_weights_and_inputs(tmp_path):
    cached = _mini_tofu()._cached
    calls = []

    def evaluate():
        calls.append(1)
        return {"p": [0.5, len(calls)]}

    h = types.SimpleNamespace(model_hash="aa")
    first = cached(h, tmp_path, [[{"question": "q1"}], 24], evaluate)
    assert cached(h, tmp_path, [[{"question": "q1"}], 24], evaluate) == first and len(calls) == 1
    assert cached(h, tmp_path, [[{"question": "q2"}], 24], evaluate)["p"][1] == 2  # other questions
    assert (
        cached(types.SimpleNamespace(model_hash="bb"), tmp_path, [[{"question": "q1"}], 24], evaluate)["p"][1]
        == 3
    )
    (f,) = [p for p in tmp_path.iterdir() if json.loads(p.read_text())["result"] == first]
    f.write_text(
        json.dumps({"key": "not the key", "result": {"p": "stale"}})
    )  # a file whose key does not match
    assert cached(h, tmp_path, [[{"question": "q1"}], 24], evaluate)["p"][1] == 4
    f.write_text("{truncated")  # a file cut short
    assert cached(h, tmp_path, [[{"question": "q1"}], 24], evaluate)["p"][1] == 5
    assert cached(h, tmp_path, [[{"question": "q1"}], 24], evaluate)["p"][1] == 5  # and saved again
