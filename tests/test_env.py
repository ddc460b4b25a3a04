"""Process settings: the thread policy (explicit, $LOKA_THREADS, auto) and the lazy start-up imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import loka
from loka import env
from loka.cli import main


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_explicit_and_environment_threads(monkeypatch):
    assert env.set_threads(1) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("LOKA_THREADS", "2")
    assert env.set_threads() == 2 and torch.get_num_threads() == 2
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv("LOKA_THREADS", bad)
        with pytest.raises(loka.ConfigError, match="LOKA_THREADS"):
            env.set_threads()
    with pytest.raises(loka.ConfigError, match="--threads"):
        env.set_threads("0")


def test_auto_leaves_the_busy_cpus_alone(monkeypatch):
    monkeypatch.setattr(env, "available_cpus", lambda: 4)
    monkeypatch.setattr(env, "busy_cpus", lambda: 0)
    assert env.auto_threads() == 4
    monkeypatch.setattr(env, "busy_cpus", lambda: 3)
    assert env.auto_threads() == 1
    monkeypatch.setattr(env, "busy_cpus", lambda: 9)  # more busy tasks than CPUs: still one thread
    assert env.auto_threads() == 1
    monkeypatch.setenv("LOKA_THREADS", "auto")
    assert env.set_threads() == 1


def test_busy_cpus_reads_the_runnable_count(monkeypatch, tmp_path):
    reads = iter(["0.5 0.5 0.5 3/200 1\n", "0.5 0.5 0.5 2/200 1\n", "0.5 0.5 0.5 4/200 1\n"])

    class FakePath:
        def __init__(self, *_):
            pass

        def read_text(self):
            return next(reads)

    monkeypatch.setattr(env, "Path", FakePath)
    assert env.busy_cpus(samples=3, interval=0) == 1  # the fewest runnable (2) less this process


def test_cli_threads_flag(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-llama", "--threads", "1", "--max-new-tokens", "2", "x"]) == 0
    assert torch.get_num_threads() == 1
    assert main(["generate", "--model", "tiny-llama", "--threads", "zero", "x"]) == 2
    assert "--threads must be a positive integer or 'auto'" in capsys.readouterr().err


def test_help_and_models_import_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from loka.cli import main\n"
        "for argv in (['--help'], ['kg', 'stats', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "main(['models'])\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tiny-llama" in out.stdout
