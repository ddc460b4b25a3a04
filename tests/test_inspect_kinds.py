"""``loka inspect`` names the artifact's kind and gives a norm only to tensors that hold values: MEMOIR's
index tensors (permutation, masks, columns) show their shape and dtype, no norm; an adapter shows its
merged update (it used to fail on it)."""

from __future__ import annotations

import json

import pytest

import loka
from loka.cli import main

A = loka.EditRequest("{} was born in the city of", "Zorblax Quint", "Qx")
INDEX = ("memoir.perm", "memoir.masks", "memoir.cols")


@pytest.fixture(scope="module")
def memoir_artifact(tmp_path_factory):
    h = loka.load_model("tiny-llama")
    art = loka.edit(h, [A], "memoir", {"layer": 1, "n_iter": 2, "n_prefixes": 1}, progress=False, apply=False)
    return art.save(tmp_path_factory.mktemp("m") / "m.loka")


def _inspect(capsys, *argv) -> str:
    assert main(["inspect", *argv]) == 0
    return capsys.readouterr().out


def test_memoir_index_tensors_have_no_norm(capsys, memoir_artifact):
    lines = _inspect(capsys, str(memoir_artifact)).splitlines()
    assert "kind       memory" in lines and "method     memoir" in lines
    rows = {ln.split()[0]: ln for ln in lines[lines.index("deltas") + 1 :] if ln.startswith("  memoir.")}
    assert set(rows) == {*INDEX, "memoir.delta", "memoir.background"}
    for name in INDEX:
        assert "norm" not in rows[name].replace("(no norm)", "") and "float32 holding indices" in rows[name]
    for name in ("memoir.delta", "memoir.background"):
        assert " norm " in rows[name]


def test_memoir_json_has_kind_and_no_index_norms(capsys, memoir_artifact):
    s = json.loads(_inspect(capsys, str(memoir_artifact), "--json"))
    assert s["kind"] == "memory"
    assert set(s["delta_norms"]) == {"memoir.delta", "memoir.background"}
    for name in INDEX:
        assert s["deltas"][name] == {**s["deltas"][name], "indices": True} and "norm" not in s["deltas"][name]
        assert s["deltas"][name]["shape"] == s["params"][name]["shape"]


def test_weight_delta_and_adapter_show_kind_and_norms(capsys, tmp_path):
    h = loka.load_model("tiny-llama")
    w = h.weight_name(1)
    lora = loka.edit(h, [A], "lora", {"layers": [1], "max_steps": 2}, progress=False, apply=False)
    out = _inspect(capsys, str(lora.save(tmp_path / "l.loka")))
    assert "kind       adapter" in out
    [row] = [ln for ln in out.splitlines() if ln.startswith(f"  {w}")]
    assert f"shape {list(h.param(w).shape)}  norm " in row
    ft = loka.Artifact.create(
        {w: h.param(w).detach() * 0 + 1}, method="ft", hparams={}, requests=[], handle=h
    )
    out = _inspect(capsys, str(ft.save(tmp_path / "f.loka")))
    assert "kind       weight-delta" in out and "holding indices" not in out


def test_a_fresh_process_knows_the_index_tensors(memoir_artifact):
    """``loka inspect`` in a process that has run no method still knows which tensors are indices (the
    methods declare them when they are registered)."""
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "loka.cli", "inspect", str(memoir_artifact)],
        capture_output=True,
        text=True,
        env={**os.environ, "LOKA_THREADS": "1"},
        timeout=120,
        check=True,
    ).stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("  memoir.perm")]
    assert rows and "holding indices (no norm)" in rows[0]
