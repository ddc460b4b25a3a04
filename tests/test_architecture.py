"""The design rules that keep a new method one file plus one config: capabilities come from the
registry (no list of method names anywhere else), methods declare what they do, configs may extend
others, and the package's own tests of layers live in tests/test_layers.py."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

import loka
from loka.methods import REGISTRY, default_hparams, methods_for
from loka.methods.base import method_config

SRC = Path(loka.__file__).parent


def test_no_list_of_method_names_outside_the_registry():
    names = set(REGISTRY)
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                consts = [
                    e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
                ]
                hits = [c for c in consts if c in names]
                if len(hits) >= 2:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {hits}")
    assert not offenders, "derive these from the registry (methods_for, Method.tasks):\n" + "\n".join(
        offenders
    )


def test_no_method_tests_request_types():
    for path in sorted((SRC / "methods").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "isinstance(r, ForgetRequest" not in text and "isinstance(r, RetainRequest" not in text, path


def test_every_method_declares_what_it_does():
    for name, m in REGISTRY.items():
        assert m.tasks and m.tasks <= {"edit", "forget", "retain"}, name
        assert m.primary in m.tasks, name
        assert m.kind in ("weight-delta", "adapter", "memory", "context"), name
    assert "npo" in methods_for("forget") and "rome" not in methods_for("forget")
    assert set(methods_for("edit")) == set(REGISTRY)


def _handle(name: str, family: str, n_layers: int):
    return SimpleNamespace(name=name, spec=SimpleNamespace(family=family), n_layers=n_layers)


def test_configs_extend_others():
    h = _handle("smollm2-135m", "llama", 30)
    memit, alpha, lyap = (default_hparams(m, h).to_dict() for m in ("memit", "alphaedit", "lyaplock"))
    for k in ("layers", "v_steps", "clamp_norm_factor", "mom2_n_tokens"):
        assert alpha[k] == memit[k] == lyap[k], k
    assert alpha["nullspace_threshold"] == 0.02 and lyap["alpha"] == 60.0
    assert memit["v_lr"] == lyap["v_lr"] == 2.0 and alpha["v_lr"] == 1.0  # an extending config overrides
    assert memit["v_dtype"] == alpha["v_dtype"] == lyap["v_dtype"] == "bfloat16"  # and inherits the rest
    for m in ("ga", "gd", "idk", "dpo", "relearn"):  # the trainers share NPO's config
        assert method_config(m, h) == method_config("npo", h)


def test_a_config_that_extends_in_a_loop_is_refused(monkeypatch):
    import loka.methods.base as base

    def fake(method, key):
        return {"extends": "b"} if method == "a" else {"extends": "a"} if method == "b" else None

    monkeypatch.setattr(base, "_config", fake)
    with pytest.raises(loka.ConfigError, match="loops"):
        method_config("a", _handle("x", "llama", 4))
