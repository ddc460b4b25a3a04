"""Reports of evaluation runs: per-case before/after in results.jsonl, ``loka report`` pages for each
mode, ``loka compare``, and the pages as Chromium renders them."""

import json
import math

import pytest

import loka
from loka.cli import main as cli
from loka.eval.data import load_cases
from loka.eval.run_report import compare, compare_rows, render_report, write_report
from loka.eval.runner import EvalConfig, format_summary, run_eval

from .browser import chrome, full_page_screenshot, rendered_images
from .conftest import DATA


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_corpus):
    """Three runs on tiny-llama: ROME single (with generations), MEMIT batch, MEMIT sequential."""
    handle = loka.load_model("tiny-llama")
    hp = {"mom2_n_tokens": 500, "mom2_corpus": str(text_corpus), "v_steps": 3}
    cases = load_cases(DATA / "counterfact_sample5.json", n=4)
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, method, mode, bs, gen in (
        ("single", "rome", "single", 1, True),
        ("batch", "memit", "batch", 2, False),
        ("seq", "memit", "sequential", 2, False),
    ):
        cfg = EvalConfig(method=method, mode=mode, batch_size=bs, hparams=hp, generation=gen)
        out[name] = (root / name, run_eval(handle, cases, cfg, root / name))
    return out, cases


def _rows(folder):
    return [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]


def test_results_hold_each_cases_prompt_and_answers_before_and_after(runs):
    out, cases = runs
    for name in ("single", "batch", "seq"):
        rows = _rows(out[name][0])
        assert [r["case_id"] for r in rows] == [str(c.case_id) for c in cases]
        for r, c in zip(rows, cases):
            assert r["prompt"] == c.rewrite[0] and r["target_new"] == c.target_new
            assert r["target_true"] == c.target_true
            for when in ("before", "after"):
                assert isinstance(r[when]["top"], str) and 0 <= r[when]["p_new"] <= 1 and "p_true" in r[when]
    single = _rows(out["single"][0])
    # the edit moved the probabilities (scored with the edit applied, not the reverted model)
    assert any(abs(math.log(r["after"]["p_new"] / r["before"]["p_new"])) > 1e-3 for r in single)
    assert all(isinstance(r[w]["generation"], str) for r in single for w in ("before", "after"))
    # the unedited answers do not depend on the method
    assert [r["before"] for r in _rows(out["batch"][0])] == [r["before"] for r in _rows(out["seq"][0])]


def test_single_and_batch_runs_say_their_guard_is_the_unedited_models(runs):
    out, _ = runs
    for name in ("single", "batch"):
        s = out[name][1]
        assert "guard_post" not in s and "unedited model" in s["guard_note"]
        assert s["guard_note"] in format_summary(s)
    seq = out["seq"][1]
    assert "guard_note" not in seq and seq["guard_post"] == seq["sequential"][-1]["guard"]
    assert seq["edit_seconds"] > 0  # sequential runs time their edits too


def test_report_page_per_mode(runs, tmp_path):
    out, cases = runs
    page = render_report([out[n][0] for n in ("single", "batch", "seq")])
    for name in ("single", "batch", "seq"):
        assert f"<h3 id='{name}'>" in page
    assert page.count("cases (4)") == 3 and page.count("checkpoints") == 1
    assert page.count("data:image/png;base64,") == 1  # the sequential plot
    assert page.count("guard measured on the unedited model") == 2  # single and batch, not sequential
    assert cases[0].rewrite[0] in page and "generation after" in page
    assert "http" not in page  # self-contained
    # a folder of run folders reads as its runs
    assert write_report([out["single"][0].parent], tmp_path / "r.html").read_text().count("cases (4)") == 3


def test_compare_shows_runs_side_by_side(runs, tmp_path, capsys):
    out, _ = runs
    dirs = [str(out[n][0]) for n in ("single", "batch", "seq")]
    head, rows = compare_rows(compare(dirs))
    assert [r[0] for r in rows] == ["(unedited)", "single", "batch", "seq"]  # one baseline: same model, cases
    es = head.index("ES")
    assert rows[1][es] == out["single"][1]["post"]["ES"] and rows[0][es] == out["single"][1]["pre"]["ES"]
    after = head.index("ppl after")
    assert rows[1][after] is None and rows[3][after] == out["seq"][1]["guard_post"]["ppl"]
    assert cli(["compare", *dirs, "--html", str(tmp_path / "c.html")]) == 0
    text = capsys.readouterr().out
    assert text.count("(unedited)") == 1 and "sequential" in text and "ppl after" in text
    assert "<table" in (tmp_path / "c.html").read_text()
    assert cli(["compare", *dirs, "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in js] == ["(unedited)", "single", "batch", "seq"]


def test_report_and_compare_refuse_what_is_not_a_run(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    for cmd in (["compare", str(tmp_path / "mine")], ["report", str(tmp_path / "missing")]):
        assert cli(cmd) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "loka eval --out" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"


def test_forced_rerun_of_a_sequential_run_starts_clean(runs, text_corpus):
    """--force replaces a sequential run: its batch index and edit log go with its artifacts."""
    out, cases = runs
    handle = loka.load_model("tiny-llama")
    hp = {"mom2_n_tokens": 500, "mom2_corpus": str(text_corpus), "v_steps": 3}
    cfg = EvalConfig(method="memit", mode="sequential", batch_size=2, hparams=hp, guard=False)
    folder = out["seq"][0].parent / "seq-again"
    run_eval(handle, cases[:2], cfg, folder)
    s = run_eval(handle, cases[:2], cfg, folder, force=True)
    assert s["post"]["n"] == 2 and len((folder / "edits.jsonl").read_text().splitlines()) == 1


def test_report_and_compare_render_in_chromium(runs, tmp_path):
    out, _ = runs
    report = write_report([out[n][0] for n in ("single", "batch", "seq")], tmp_path / "report.html")
    shots = tmp_path / "shots"
    shots.mkdir()
    with chrome(tmp_path) as d:
        d.get(report.as_uri())
        tables = d.find_elements("css selector", "table")
        assert len(tables) >= 10 and d.title == "loka report"
        cells = d.find_elements("css selector", "details table tbody tr")
        assert len(cells) == 12 and all(c.is_displayed() for c in cells)  # 4 cases × 3 runs, shown
        imgs = rendered_images(d)
        assert [i["alt"] for i in imgs] == ["sequential"] and all(i["ok"] and i["w"] > 300 for i in imgs)
        png = full_page_screenshot(d, shots / "report.png")
        assert png.stat().st_size > 20_000
        (tmp_path / "c.html").write_text("")
        assert (
            cli(
                [
                    "compare",
                    *[str(out[n][0]) for n in ("single", "batch", "seq")],
                    "--html",
                    str(tmp_path / "c.html"),
                ]
            )
            == 0
        )
        d.get((tmp_path / "c.html").as_uri())
        rows = d.find_elements("css selector", "tbody tr")
        assert [r.find_element("css selector", "td").text for r in rows] == [
            "(unedited)",
            "single",
            "batch",
            "seq",
        ]
        full_page_screenshot(d, shots / "compare.png")
