"""benchmarks/lifelong.py: bad flags and data refused in one line (exit 2) before any model loads, results
and plot under --results (the repository's benchmarks/results by default, never the current folder),
``_wild`` in both names, rows of other data or settings never merged (the file is left as it was), a
row's folder resumed with a word and a folder of other settings refused with this script's fix."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WILD_RESULT = ROOT / "benchmarks" / "results" / "lifelong_smollm2-135m_n10000_wild.json"
STREAM = ROOT / "data" / "generated" / "lifelong_10000.json"


@pytest.fixture(scope="module")
def ll():
    name = "loka_bench_lifelong"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "lifelong.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def data4(tmp_path_factory) -> Path:
    """Four records of the lifelong stream."""
    from loka.bench.lifelong import build_lifelong, dumps_records

    p = tmp_path_factory.mktemp("data") / "d4.json"
    p.write_bytes(dumps_records(build_lifelong(4, seed=0)[0]))
    return p


@pytest.fixture
def no_model(ll, monkeypatch):
    """Fail the test if the script loads a model: refusals must come before."""

    def load_model(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(ll.loka, "load_model", load_model)


def _main(ll, argv, capsys) -> tuple[int, str, str]:
    try:
        rc = ll.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(rc: int, err: str, *words: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---- refusals before any model ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--batch", "0"], ["--batch", "0"]),
        (["--batch", "-3"], ["--batch"]),
        (["--n", "0"], ["--n"]),
        (["--batch", "8"], ["--batch 8", "--n 4"]),
        (["--every", "0"], ["--every"]),
        (["--score-sample", "0"], ["--score-sample"]),
        (["--max-hours", "0"], ["--max-hours"]),
        (["--max-hours", "nan"], ["--max-hours"]),
        (["--checkpoints", "3"], ["--checkpoints 3", "--batch 2", "2 or 4"]),  # not a batch end
        (["--checkpoints", "2", "6"], ["--checkpoints 6", "--n 4"]),  # past the last edit
        (["--tag", "a/b"], ["--tag"]),
        (["--rows", "nope"], ["--rows", "nope"]),
        (["--batch", "x"], ["--batch", "'x'"]),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(ll, data4, tmp_path, capsys, no_model, extra, words):
    argv = ["--model", "tiny-llama", "--n", 4, "--batch", 2, "--data", data4, "--results", tmp_path / "r"]
    rc, out, err = _main(ll, [*argv, "--out", tmp_path / "o", *extra], capsys)
    _refused(rc, err, *words)
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_more_edits_than_records_is_refused(ll, data4, tmp_path, capsys, no_model):
    rc, _, err = _main(
        ll, ["--n", 10, "--batch", 2, "--data", data4, "--results", tmp_path / "r", "--out", tmp_path], capsys
    )
    _refused(rc, err, "--n 10", str(data4), "only 4 records", "loka data lifelong --n 10")


def test_a_missing_data_file_is_refused_not_built(ll, tmp_path, capsys, no_model):
    typo = tmp_path / "typo.json"
    rc, _, err = _main(ll, ["--n", 4, "--batch", 2, "--data", typo, "--results", tmp_path / "r"], capsys)
    _refused(rc, err, f"--data {typo}", "does not exist", f"loka data lifelong --n 4 --out {typo}")
    assert not typo.exists()


def test_results_file_of_other_data_is_refused_and_left_as_it_was(ll, data4, tmp_path, capsys, no_model):
    res = tmp_path / "r" / "lifelong_tiny-llama_n4.json"
    res.parent.mkdir()
    other = {"path": "other.json", "sha256": "ab" * 32}
    res.write_text(
        json.dumps(
            {"model": "tiny-llama", "n": 4, "batch": 2, "checkpoints": [2, 4], "rows": {"grace": {"ES": 1.0}}}
            | {"series": {}, "data": other}
        )
    )
    before = res.read_bytes()
    argv = ["--model", "tiny-llama", "--n", 4, "--batch", 2, "--data", data4, "--results", tmp_path / "r"]
    rc, _, err = _main(ll, argv, capsys)
    _refused(rc, err, str(res), str(data4), "other.json", "--results")
    assert res.read_bytes() == before


def test_results_file_of_other_settings_names_checkpoints(ll, data4, tmp_path, capsys, no_model):
    res = tmp_path / "r" / "lifelong_tiny-llama_n4.json"
    res.parent.mkdir()
    res.write_text(
        json.dumps({"model": "tiny-llama", "n": 4, "batch": 2, "checkpoints": [4], "rows": {"a": {}}})
    )
    before = res.read_bytes()
    argv = ["--model", "tiny-llama", "--n", 4, "--batch", 2, "--data", data4, "--results", tmp_path / "r"]
    rc, _, err = _main(ll, argv, capsys)
    _refused(rc, err, str(res), "--checkpoints", "--results")
    assert "--every," not in err and "/--every" not in err
    assert res.read_bytes() == before


def test_a_file_the_script_did_not_write_is_never_overwritten(ll, data4, tmp_path, capsys, no_model):
    res = tmp_path / "r" / "lifelong_tiny-llama_n4.json"
    res.parent.mkdir()
    res.write_text("my notes\n")
    argv = ["--model", "tiny-llama", "--n", 4, "--batch", 2, "--data", data4, "--results", tmp_path / "r"]
    rc, _, err = _main(ll, argv, capsys)
    _refused(rc, err, str(res), "--results")
    assert res.read_text() == "my notes\n"


# ---- where results go, and which data rows come from -----------------------------------------------
def test_result_and_plot_names_carry_wild_and_tag(ll):
    res, plot = ll.result_paths(Path("R"), "m", 10, True, "abl")
    assert res == Path("R/lifelong_m_n10_wild_abl.json") and plot == Path(
        "R/plots/lifelong_m_n10_wild_abl.png"
    )
    plain = ll.result_paths(Path("R"), "m", 10, False, None)
    assert plain == (Path("R/lifelong_m_n10.json"), Path("R/plots/lifelong_m_n10.png"))


def test_default_results_are_the_repositorys_whatever_the_cwd(ll, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ll.DEFAULT_RESULTS == ROOT / "benchmarks" / "results" and ll.DEFAULT_RESULTS.is_absolute()
    assert ll.parser().parse_args([]).results is None  # None: DEFAULT_RESULTS
    assert str(ll.DEFAULT_RESULTS) in ll.parser().format_help().replace("\n", "").replace(" ", "")


def test_every_flag_has_help(ll):
    for a in ll.parser()._actions:
        assert a.help, a.option_strings


def test_committed_wild_result_still_merges(ll):
    """The committed file records no data hash; its rows' commands name --data, the shipped stream."""
    d = json.loads(WILD_RESULT.read_text())
    setting = (d["n"], d["batch"], tuple(d["checkpoints"]))
    rows, series = ll._rows_of(WILD_RESULT, setting, STREAM, ll.data_record(STREAM))
    assert rows == d["rows"] and series == d["series"]
    with pytest.raises(ll.ConfigError, match="other data"):
        ll._rows_of(WILD_RESULT, setting, ROOT / "data/generated/cf_lifelong.json", {"sha256": "0" * 64})


def test_a_legacy_file_is_checked_against_its_commands_data(ll, tmp_path, monkeypatch):
    """A file without a data hash is checked against the ``--data`` of its recorded commands, read from
    the repository root wherever the file is."""
    monkeypatch.setattr(ll, "ROOT", tmp_path)
    res = tmp_path / "elsewhere" / "r.json"
    res.parent.mkdir(parents=True)
    (tmp_path / "d.json").write_text("[]")
    cmd = "python benchmarks/lifelong.py --data d.json --n 4"
    res.write_text(
        json.dumps(
            {"n": 4, "batch": 2, "checkpoints": [2, 4], "rows": {"a": {"provenance": {"command": cmd}}}}
        )
    )
    info = {"sha256": "1" * 64}
    assert ll._rows_of(res, (4, 2, (2, 4)), tmp_path / "d.json", info)[0] == {
        "a": {"provenance": {"command": cmd}}
    }
    with pytest.raises(ll.ConfigError, match="--data d.json"):
        ll._rows_of(res, (4, 2, (2, 4)), tmp_path / "e.json", info)


# ---- a tiny run: paths, data record, resume, a folder of other settings -----------------------------
def test_a_tiny_run_writes_under_results_resumes_and_refuses_other_settings(
    ll, data4, tmp_path, monkeypatch, capsys
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    r, o = tmp_path / "r", tmp_path / "o"
    argv = ["--model", "tiny-llama", "--rows", "grace", "--n", 4, "--batch", 2, "--data", data4, "--out", o]
    rc, out, err = _main(ll, [*argv, "--results", r, "--wild"], capsys)
    assert rc == 0, err
    assert list(cwd.iterdir()) == []  # nothing relative to the current folder
    res = r / "lifelong_tiny-llama_n4_wild.json"
    assert res.is_file() and (r / "plots" / "lifelong_tiny-llama_n4_wild.png").is_file()
    d = json.loads(res.read_text())
    assert d["data"]["sha256"] == _sha(data4) and d["rows"]["grace"]["data"] == d["data"]
    assert d["checkpoints"] == [2, 4] and d["rows"]["grace"]["edits"] == 4
    assert (o / "tiny-llama-grace-b2-n4-wild" / "config.json").is_file()

    # a wild row's folder from before the -wild suffix is resumed where it is, with a word
    (o / "tiny-llama-grace-b2-n4-wild").rename(o / "tiny-llama-grace-b2-n4")
    rc, out, err = _main(ll, [*argv, "--results", r, "--wild"], capsys)
    assert rc == 0, err
    assert f"grace: resuming at 4 of 4 edits from {o / 'tiny-llama-grace-b2-n4'}" in out
    assert not (o / "tiny-llama-grace-b2-n4-wild").exists()

    # the same folder without --wild: refused in one line with this script's fix (it has no --resume)
    rc, out, err = _main(ll, [*argv, "--results", r], capsys)
    assert rc == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "wild: True in the folder" in line and "rerun with the settings that folder was made with" in line
    assert "--resume" not in line
    assert not (r / "lifelong_tiny-llama_n4.json").exists()
