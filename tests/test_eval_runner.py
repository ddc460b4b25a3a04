import json

import pytest

import loka
from loka.eval.data import load_cases
from loka.eval.runner import EvalConfig, run_eval

from .conftest import DATA


@pytest.fixture(scope="module")
def tiny():
    return loka.load_model("tiny-llama")


@pytest.fixture
def hp(text_corpus):
    return {"mom2_n_tokens": 500, "mom2_corpus": str(text_corpus), "v_steps": 3}


def test_single_mode_writes_results_and_resumes(tiny, hp, tmp_path, monkeypatch):
    cases = load_cases(DATA / "counterfact_sample5.json", n=3)
    cfg = EvalConfig(method="rome", mode="single", hparams=hp, guard=False)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    s = run_eval(tiny, cases[:2], cfg, tmp_path)
    assert s["post"]["n"] == 2 and "ES" in s["post"] and "locality" in s["post"]
    assert all(torch_equal(v, before[k]) for k, v in tiny.model.state_dict().items())  # every edit reverted
    # resume with the third case: the first two are not edited again
    import loka.eval.runner as runner

    calls = []
    real = runner.edit
    monkeypatch.setattr(
        runner, "edit", lambda h, reqs, *a, **k: calls.append(reqs[0].subject) or real(h, reqs, *a, **k)
    )
    s = run_eval(tiny, cases, cfg, tmp_path, resume=True)
    assert calls == [cases[2].requests[0].subject]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and s["post"]["n"] == 3
    edits = [json.loads(x) for x in (tmp_path / "edits.jsonl").read_text().splitlines()]
    assert [e["case_ids"] for e in edits] == [
        [str(c.case_id)] for c in cases
    ]  # one line per edit, kept on resume
    assert {"keys", "values", "update"} <= edits[0]["timings"].keys()
    assert s["edit_seconds"] == pytest.approx(sum(e["seconds"] for e in edits), abs=0.2)
    assert json.loads((tmp_path / "summary.json").read_text())["post"]["n"] == 3


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_method_none_is_the_unedited_row(tiny, tmp_path):
    cases = load_cases(DATA / "counterfact_sample5.json", n=2)
    s = run_eval(tiny, cases, EvalConfig(method="none", guard=False), tmp_path)
    assert s["pre"] == s["post"]


def test_sequential_mode_checkpoints_plot_and_resume(tiny, hp, tmp_path):
    cases = load_cases(DATA / "counterfact_sample5.json", n=4)
    cfg = EvalConfig(
        method="memit",
        mode="sequential",
        batch_size=2,
        hparams={**hp, "layers": [1, 2]},
        guard=True,
        checkpoints=(2,),
    )
    s = run_eval(tiny, cases, cfg, tmp_path)
    ck = [json.loads(x) for x in (tmp_path / "sequential.jsonl").read_text().splitlines()]
    assert [c["n_edits"] for c in ck] == [2, 4] and "ppl" in ck[-1]["guard"]
    assert (tmp_path / "sequential.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == [
        "batch_00000.loka",
        "batch_00001.loka",
    ]
    # the run leaves the model as it found it
    assert not tiny.model.__dict__.get("_loka_applied")
    # resuming a finished run re-applies the saved batches and edits nothing new
    s2 = run_eval(tiny, cases, cfg, tmp_path, resume=True)
    assert len((tmp_path / "sequential.jsonl").read_text().splitlines()) == 2
    assert s2["post"]["n"] == s["post"]["n"] == 4


def test_resume_refuses_other_settings(tiny, hp, tmp_path):
    cases = load_cases(DATA / "counterfact_sample5.json", n=1)
    run_eval(tiny, cases, EvalConfig(method="none", guard=False), tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        run_eval(tiny, cases, EvalConfig(method="rome", hparams=hp, guard=False), tmp_path, resume=True)


def test_resume_refuses_a_changed_default(tiny, hp, tmp_path, monkeypatch):
    """A method's config changed between the run and its resumption (a new SmolLM2 default, say): the
    given overrides are the same, but the method would run with other hyperparameters."""
    cases = load_cases(DATA / "counterfact_sample5.json", n=2)
    cfg = EvalConfig(method="rome", mode="single", hparams=hp, guard=False)
    run_eval(tiny, cases[:1], cfg, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["resolved_hparams"]
    assert saved["v_steps"] == 3 and "v_lr" in saved  # what the method ran with, defaults included
    import loka.methods.base as base

    real = base.method_config
    monkeypatch.setattr(base, "method_config", lambda m, h: {**real(m, h), "v_lr": 0.123})
    with pytest.raises(loka.ConfigError, match=r"resolved_hparams\.v_lr: .* in the folder, 0\.123 now"):
        run_eval(tiny, cases, cfg, tmp_path, resume=True)
    monkeypatch.setattr(base, "method_config", real)
    run_eval(tiny, cases, cfg, tmp_path, resume=True)  # unchanged: it goes on


def test_unedited_scores_are_shared_between_runs(tiny, tmp_path, monkeypatch):
    import loka.eval.runner as runner

    monkeypatch.setenv("LOKA_HOME", str(tmp_path / "home"))
    cases = load_cases(DATA / "counterfact_sample5.json", n=2)
    run_eval(tiny, cases, EvalConfig(method="none", guard=False), tmp_path / "a")
    monkeypatch.setattr(runner, "_scores_many", lambda *a, **k: pytest.fail("unedited scores recomputed"))
    s = run_eval(tiny, cases, EvalConfig(method="none", guard=False), tmp_path / "b")
    assert s["post"]["n"] == 2


def test_sequential_alphaedit_with_prune_carries_state_across_batches_and_resume(
    tiny, hp, tmp_path, monkeypatch
):
    from loka.state import EditState

    cases = load_cases(DATA / "counterfact_sample5.json", n=4)
    cfg = EvalConfig(
        method="alphaedit",
        mode="sequential",
        batch_size=2,
        guard=False,
        checkpoints=(2,),
        hparams={**hp, "layers": [1, 2]},
        prune=2.0,
    )
    import loka.eval.runner as runner

    seen = []
    real_edit = runner.edit

    def spy(handle, reqs, method, hparams, **kw):
        seen.append(len(kw["state"].tensors))
        return real_edit(handle, reqs, method, hparams, **kw)

    monkeypatch.setattr(runner, "edit", spy)
    run_eval(tiny, cases, cfg, tmp_path)
    assert seen == [
        0,
        4,
    ]  # the second batch sees the first's past keys and PRUNE accumulation (2 layers each)
    state = EditState.load(tmp_path / "state")
    assert state.meta["batches"] == 2 and set(state.meta["prune_sigma_max"]) == {
        tiny.weight_name(1),
        tiny.weight_name(2),
    }
    man = json.loads((tmp_path / "artifacts" / "batch_00001.loka" / "manifest.json").read_text())
    assert man["extra"]["prune_alpha"] == 2.0
    # a state that lags behind the artifacts is refused on resume, with the fix in the message
    state.meta["batches"] = 1
    state.save(tmp_path / "state")
    with pytest.raises(loka.LokaError, match="delete .*batch_00001.loka"):
        run_eval(tiny, cases, cfg, tmp_path, resume=True)
    assert not tiny.model.__dict__.get("_loka_applied")  # refused before anything was applied


def test_sequential_score_sample_scores_a_seeded_subset(tiny, hp, tmp_path):
    from loka.eval.runner import checkpoint_cases

    cases = load_cases(DATA / "counterfact_sample5.json", n=4)
    cfg = EvalConfig(
        method="memit",
        mode="sequential",
        batch_size=2,
        hparams={**hp, "layers": [1, 2]},
        guard=False,
        checkpoints=(2,),
        score_sample=3,
    )
    run_eval(tiny, cases, cfg, tmp_path)
    ck = [json.loads(x) for x in (tmp_path / "sequential.jsonl").read_text().splitlines()]
    assert [(c["n_edits"], c["n"]) for c in ck] == [(2, 2), (4, 3)]  # all 2 after batch 1, then 3 of 4
    scored = [json.loads(x)["case_id"] for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert scored == [str(c.case_id) for c in checkpoint_cases(cases, 3, 4)]
    # each checkpoint carries the unedited scores of the very cases it scored
    res = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert ck[-1]["pre"]["ES"] == pytest.approx(sum(r["pre"]["ES"] for r in res) / 3)
    # the sample is a function of the checkpoint: the same on a rerun, in edit order, without repeats
    pick = checkpoint_cases(list(range(100)), 10, 400)
    assert pick == checkpoint_cases(list(range(100)), 10, 400) == sorted(set(pick)) and len(pick) == 10
    assert checkpoint_cases(list(range(100)), 10, 700) != pick
    # a resumed run must use the same sample size
    with pytest.raises(ValueError, match="other settings"):
        run_eval(
            tiny,
            cases,
            EvalConfig(
                method="memit",
                mode="sequential",
                batch_size=2,
                hparams={**hp, "layers": [1, 2]},
                guard=False,
                checkpoints=(2,),
            ),
            tmp_path,
            resume=True,
        )


def test_score_sample_needs_sequential_mode():
    with pytest.raises(loka.LokaError, match="score_sample .*sequential"):
        EvalConfig(method="rome", mode="batch", score_sample=10)
    with pytest.raises(loka.LokaError, match="positive"):
        EvalConfig(method="rome", mode="sequential", score_sample=0)


def test_evaluate_from_python_returns_the_cli_summary(tiny, hp, tmp_path):
    s = loka.evaluate(tiny, DATA / "counterfact_sample5.json", method="rome", n=2, hparams=hp, guard=False)
    assert s["post"]["n"] == 2 and "ES" in s["post"] and s["config"]["method"] == "rome"
    kept = loka.evaluate(
        tiny, DATA / "counterfact_sample5.json", method="none", n=1, guard=False, out=tmp_path / "r"
    )
    assert (tmp_path / "r" / "summary.json").exists() and kept["post"]["n"] == 1


def test_a_checkpoint_that_ends_past_the_budget_is_the_last(tiny, hp, tmp_path, monkeypatch):
    """The budget is checked again after a checkpoint is scored: the run stops there, not one batch on."""
    import loka.eval.runner as runner

    cases = load_cases(DATA / "counterfact_sample5.json", n=4)
    cfg = EvalConfig(
        method="rome", mode="sequential", batch_size=1, hparams=hp, guard=False, checkpoints=(1, 4)
    )
    cfg.max_seconds = 3600.0
    now = [0.0]
    monkeypatch.setattr(runner, "_clock", lambda: now[0])
    real = runner.summarise

    def slow(rows, key="post"):  # scoring the first checkpoint "takes" two hours
        now[0] = 7200.0
        return real(rows, key)

    monkeypatch.setattr(runner, "summarise", slow)
    s = run_eval(tiny, cases, cfg, tmp_path)
    assert [r["n_edits"] for r in s["sequential"]] == [1] and s["post"]["n"] == 1


def test_a_sequential_run_out_of_time_stops_with_a_checkpoint_and_resumes(tiny, hp, tmp_path, monkeypatch):

    cases = load_cases(DATA / "counterfact_sample5.json", n=4)
    cfg = EvalConfig(
        method="rome", mode="sequential", batch_size=1, hparams=hp, guard=False, checkpoints=(4,)
    )
    cfg.max_seconds = 1e-9  # past after the first batch
    s = run_eval(tiny, cases, cfg, tmp_path)
    assert [r["n_edits"] for r in s["sequential"]] == [1] and s["post"]["n"] == 1
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    cfg.max_seconds = None
    s = run_eval(tiny, cases, cfg, tmp_path, resume=True)
    assert [r["n_edits"] for r in s["sequential"]] == [1, 4]
    assert s["post"]["n"] == 4  # the final rows replace the early stop's, not added to them
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    assert all(torch_equal(v, before[k]) for k, v in tiny.model.state_dict().items())


def test_a_sampled_sequential_run_scores_only_the_drawn_cases_unedited(tiny, hp, tmp_path, monkeypatch):
    """With --score-sample, unedited scores are computed for the cases the checkpoints draw, on the
    unedited model (the edits are taken off and put back), and equal a full run's (each run with its
    own empty cache, so neither reads the other's scores)."""
    from loka import env

    cases = load_cases(DATA / "counterfact_sample5.json", n=5)
    stats = env.cache_dir("stats")  # the edit's statistics stay cached; only the eval cache is fresh
    monkeypatch.setenv("LOKA_HOME", str(tmp_path / "home1"))
    (tmp_path / "home1").mkdir()
    (tmp_path / "home1" / "stats").symlink_to(stats)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    cfg = EvalConfig(
        method="rome",
        mode="sequential",
        batch_size=1,
        hparams=hp,
        guard=False,
        checkpoints=(2, 5),
        score_sample=2,
    )
    s = run_eval(tiny, cases, cfg, tmp_path / "seq")
    assert all(torch_equal(v, before[k]) for k, v in tiny.model.state_dict().items())
    monkeypatch.setenv("LOKA_HOME", str(tmp_path / "home2"))
    run_eval(tiny, cases, EvalConfig(method="none", guard=False), tmp_path / "full")
    ref = {
        json.loads(x)["case_id"]: json.loads(x)["scores"]
        for x in (tmp_path / "full" / "pre.jsonl").read_text().splitlines()
    }
    pre = [json.loads(x) for x in (tmp_path / "seq" / "pre.jsonl").read_text().splitlines()]
    assert 2 <= len(pre) < 5

    def flat(scores):  # every teacher-forced log-probability (packing decides float rounding only)
        return [
            x for g in scores.values() for rows in g.values() for sc in rows for x in sc["token_logprobs"]
        ]

    for p in pre:
        assert flat(p["scores"]) == pytest.approx(flat(ref[p["case_id"]]), abs=1e-4)
    assert [r["n"] for r in s["sequential"]] == [2, 2]


def test_a_run_refused_for_its_hyperparameters_leaves_no_folder(tiny, tmp_path):
    """An invalid ``--set`` is refused before anything is written: the output folder is not created,
    so the same --out takes the corrected run without --force."""
    cases = load_cases(DATA / "counterfact_sample5.json", n=1)
    out = tmp_path / "run"
    with pytest.raises(loka.LokaError, match="v_steps"):
        run_eval(tiny, cases, EvalConfig(method="rome", mode="single", hparams={"v_steps": -3}), out)
    assert not out.exists()
