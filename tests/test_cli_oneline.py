"""Every refusal of the command line is one line on stderr with exit status 2 (argparse's included, in
every subcommand), ``--help`` still prints the full usage, and an unknown hyperparameter with a close
known one says which was meant."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loka.cli import main
from loka.errors import ConfigError
from loka.methods.base import did_you_mean


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOKA_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "loka.cli", *argv], capture_output=True, text=True, env=env, timeout=120
    )


def test_a_wrong_choice_is_one_line_naming_the_flag_and_the_help():
    r = _cli("edit", "--method", "ultraedt", "--requests", "r.json")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n")
    line = r.stderr.strip()
    assert line.startswith("error: loka edit: --method: invalid choice 'ultraedt' (choose from ")
    assert "'ultraedit'" in line and line.endswith("; see loka edit --help")
    assert "usage:" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["data", "lifelong", "--n", "abc"], "error: loka data lifelong: --n: invalid int value: 'abc'"),
        (["data", "lifelong"], "error: loka data lifelong: the following arguments are required: --out"),
        ([], "error: loka: the following arguments are required: COMMAND"),
        (["bogus"], "error: loka: COMMAND: invalid choice 'bogus' (choose from "),
        (["kg", "stats", "--nope"], "error: loka kg stats: unrecognized arguments: --nope"),
        (["export", "x", "--quant", "q9"], "error: loka export: --quant: invalid choice 'q9'"),
        (["inspect"], "error: loka inspect: the following arguments are required: artifact"),
    ],
)
def test_every_argparse_refusal_is_one_line_exit_2(capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        main(argv)
    cap = capsys.readouterr()
    assert e.value.code == 2 and cap.out == ""
    assert cap.err.count("\n") == 1 and cap.err.startswith(expected), cap.err
    prog = expected.split(": ")[1]
    assert cap.err.rstrip("\n").endswith(f"; see {prog} --help")


def test_help_still_prints_the_whole_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", "--help"])
    cap = capsys.readouterr()
    assert e.value.code == 0 and cap.err == ""
    assert cap.out.startswith("usage: loka edit [-h]") and cap.out.count("\n") > 20 and "--method" in cap.out


def test_version_prints_the_package_version(capsys):
    import loka

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"loka {loka.__version__}"


# -- unknown hyperparameters: did you mean ------------------------------------------------------------
def test_layers_for_a_one_layer_method_suggests_layer():
    from loka.methods import get_method

    hp = get_method("memoir").hparams_cls
    with pytest.raises(ConfigError) as e:
        hp.from_dict({"layers": [3, 4]})
    msg = str(e.value)
    assert "unknown field(s) ['layers'] for MemoirHParams" in msg
    assert msg.endswith("; did you mean 'layer'?") and "\n" not in msg


def test_close_spellings_are_suggested_and_far_ones_are_not():
    names = {"layer", "n_iter", "lr", "tau"}
    assert did_you_mean(["n_iters"], names) == "; did you mean 'n_iter'?"
    assert did_you_mean(["layer"], {"layers", "lr"}) == "; did you mean 'layers'?"
    assert did_you_mean(["zzz"], names) == ""
    assert did_you_mean(["n_iters", "zzz"], names) == "; did you mean 'n_iter' for 'n_iters'?"


def test_cli_memoir_with_layers_says_did_you_mean_layer_in_one_line(capsys):
    code = main(
        ["edit", "--model", "tiny-llama", "--method", "memoir", "--layers", "3", "4"]
        + ["--prompt", "{} x", "--subject", "a", "--target", "b"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and err.rstrip("\n").endswith("; did you mean 'layer'?")
