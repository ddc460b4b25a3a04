"""Every file loka writes atomically gets the mode a plain ``open(path, "w")`` would give it (0o666 less
the umask): the safetensors file of an artifact as well as its manifest, whatever the umask."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import loka
from loka.artifact import Artifact, load_artifact
from loka.utils.io import atomic_write_bytes, default_file_mode, save_safetensors


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_default_file_mode_is_what_open_gives(tmp_path, umask):
    with open(tmp_path / "plain", "w"):
        pass
    assert default_file_mode() == 0o666 & ~umask == _mode(tmp_path / "plain")


def test_helpers_give_a_plain_files_mode(tmp_path, umask):
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    save_safetensors({"x": torch.zeros(2)}, tmp_path / "t.safetensors")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "t.safetensors") == 0o666 & ~umask


def test_saved_artifact_files_have_the_same_mode(tmp_path, umask):
    h = loka.load_model("tiny-llama")
    w = h.weight_name(1)
    art = Artifact.create({w: torch.zeros_like(h.param(w))}, method="ft", hparams={}, requests=[], handle=h)
    path = art.save(tmp_path / "a.loka")
    modes = {name: _mode(path / name) for name in ("deltas.safetensors", "manifest.json")}
    assert modes == {"deltas.safetensors": 0o666 & ~umask, "manifest.json": 0o666 & ~umask}
    assert _mode(path) == 0o777 & ~umask  # the folder as a plain mkdir makes it
    assert load_artifact(path).id == art.id
