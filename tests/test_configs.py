"""Every shipped per-model default file is valid: a typo in a key or a file named after no model would
otherwise only fail (or be silently ignored) when that model is run with that method."""

import json
from importlib import resources

import pytest

import loka
from loka.methods.base import get_method

CONFIGS = resources.files("loka") / "configs"
FILES = sorted(
    (m.name, f.name) for m in CONFIGS.iterdir() if m.is_dir() for f in m.iterdir() if f.name.endswith(".json")
)
MODELS = {r["name"] for r in loka.list_models()}


def test_there_are_config_files():
    assert ("loka", "smollm2-135m.json") in FILES and ("memit", "default.json") in FILES


@pytest.mark.parametrize(("method", "name"), FILES)
def test_config_parses_into_its_methods_hparams(method, name):
    data = json.loads((CONFIGS / method / name).read_text())
    data.pop("layer_frac", None)
    data.pop("layers_frac", None)
    parent = data.pop("extends", None)  # the parent's fields are checked with the parent's file
    if parent:
        assert (CONFIGS / parent.split("/")[0]).is_dir(), (
            f"configs/{method}/{name} extends unknown {parent!r}"
        )
    hp = get_method(method).hparams_cls.from_dict(data, where=f"configs/{method}/{name}")
    for k, v in data.items():
        if not k.startswith("_"):
            assert getattr(hp, k) == v
    stem = name.removesuffix(".json")
    if stem != "default":  # a model file must name a registered model (a family file would name a family)
        assert stem in MODELS, f"configs/{method}/{name} names no registered model"
