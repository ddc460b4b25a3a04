"""The package's layers: every import (module-level or inside a function) points to the same layer or a
lower one, and the import graph has no circle. The layers, lowest first, are documented in
docs/architecture.md; a new module must be placed in one."""

from __future__ import annotations

import ast
from pathlib import Path

import loka

SRC = Path(loka.__file__).parent

#: lowest first; a module belongs to the first entry whose name is it or a package above it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # hf_compat wraps transformers' internals and imports nothing of loka: the model loader uses it too
    (
        "foundation",
        ("loka.errors", "loka.version", "loka.utils", "loka.resources", "loka.env", "loka.hf_compat"),
    ),
    # loka.export.remote writes the modelling file of an exported folder; ModelHandle.save_pretrained calls it
    ("models", ("loka.models", "loka.export.remote")),
    ("hooks", ("loka.trace", "loka.fastlinear", "loka.packing", "loka.weights", "loka.runtime")),
    (
        "data",
        (
            "loka.stats",
            "loka.corpus",
            "loka.requests",
            "loka.relations",
            "loka.state",
            "loka.encoder",
            "loka.forgetting",
            "loka.scoring",
        ),
    ),
    ("artifact", ("loka.artifact", "loka.sequential")),
    ("methods", ("loka.methods",)),
    ("api", ("loka.api", "loka.result", "loka.session", "loka.finetune", "loka.export")),
    ("eval", ("loka.eval", "loka.bench", "loka.analysis", "loka.report", "loka.demo")),
    ("serve", ("loka.serve",)),
    ("cli", ("loka.cli",)),
    ("facade", ("loka",)),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        out.update(t for t in targets if t in mods and t != name)
    return out


def layer_of(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(
        f"module {name} is in no layer: add it to tests/test_layers.py and docs/architecture.md"
    )


def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, p, mods) for name, p in mods.items()}


def test_every_module_has_a_layer_and_imports_point_down():
    upward = []
    for src, deps in graph().items():
        for dst in deps:
            if layer_of(dst) > layer_of(src):
                upward.append(
                    f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
                )
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_the_import_graph_has_no_circle():
    g = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(g[v]):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(g):
        if v not in state:
            cycle = visit(v)
            assert cycle is None, "import circle: " + " -> ".join(cycle)
