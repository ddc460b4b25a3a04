import json

import pytest

from loka.cli import main
from loka.requests import ForgetRequest, read_requests

from .conftest import DATA


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_models_json(capsys):
    code, out, _ = run(capsys, "models", "--json")
    names = {r["name"] for r in json.loads(out)}
    assert code == 0 and {"smollm2-135m", "tiny-llama"} <= names


@pytest.fixture
def edit_json(capsys, tmp_path, text_corpus):
    code, out, _ = run(
        capsys,
        "edit",
        "--model",
        "tiny-llama",
        "--method",
        "rome",
        "--prompt",
        "{} is located in",
        "--subject",
        "Eiffel Tower",
        "--target",
        "R",
        "--target-true",
        "Paris",
        "--paraphrase",
        "Where is Eiffel Tower? In",
        "--neighbourhood",
        "The Louvre is located in",
        "--set",
        "mom2_n_tokens=500",
        "--set",
        f"mom2_corpus={text_corpus}",
        "--set",
        "clamp_norm_factor=50",
        "--set",
        "v_weight_decay=0",
        "--set",
        "kl_factor=0",
        "--set",
        "v_steps=30",
        "--set",
        "layer=2",
        "--save",
        str(tmp_path / "e.loka"),
        "--json",
    )
    assert code == 0
    return json.loads(out), tmp_path / "e.loka"


def test_edit_json_reports_before_after_artifact_seconds(edit_json):
    res, path = edit_json
    assert set(res) == {"before", "after", "artifact", "seconds"}
    assert [r["kind"] for r in res["before"]] == ["edit", "paraphrase", "neighbourhood"]
    assert res["after"][0]["p_target_new"] > res["before"][0]["p_target_new"]
    assert res["artifact"]["path"] == str(path) and (path / "manifest.json").exists()


def test_inspect_apply_generate(capsys, edit_json, tmp_path):
    _, path = edit_json
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    assert code == 0 and json.loads(out)["method"] == "rome"
    code, out, _ = run(capsys, "inspect", str(path))
    assert "Eiffel Tower is located in" in out and "deltas" in out
    code, out, _ = run(
        capsys, "apply", "--model", "tiny-llama", "--artifact", str(path), "--out", str(tmp_path / "hf")
    )
    assert code == 0 and (tmp_path / "hf" / "config.json").exists()
    code, a, _ = run(
        capsys,
        "generate",
        "--model",
        str(tmp_path / "hf"),
        "--max-new-tokens",
        "5",
        "--json",
        "Eiffel Tower is located in",
    )
    code, b, _ = run(
        capsys,
        "generate",
        "--model",
        "tiny-llama",
        "--artifact",
        str(path),
        "--max-new-tokens",
        "5",
        "--json",
        "Eiffel Tower is located in",
    )
    assert json.loads(a) == json.loads(b)


def test_errors_exit_2_with_a_message(capsys, tmp_path):
    code, _, err = run(
        capsys, "edit", "--model", "no-such-model", "--prompt", "{} x", "--subject", "a", "--target", "b"
    )
    assert code == 2 and "unknown model 'no-such-model'" in err
    code, _, err = run(
        capsys,
        "edit",
        "--model",
        "tiny-llama",
        "--prompt",
        "no placeholder",
        "--subject",
        "a",
        "--target",
        "b",
    )
    assert code == 2 and "'prompt' must contain '{}'" in err
    code, _, err = run(
        capsys,
        "edit",
        "--model",
        "tiny-llama",
        "--prompt",
        "{} x",
        "--subject",
        "a",
        "--target",
        "b",
        "--layer",
        "9",
    )
    assert code == 2 and "out of range" in err
    code, _, err = run(capsys, "inspect", str(tmp_path / "nothing.loka"))
    assert code == 2 and "not an artifact folder" in err
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        "tiny-llama",
        "--data",
        str(DATA / "counterfact_sample5.json"),
        "--mode",
        "batch",
        "--score-sample",
        "3",
        "--out",
        str(tmp_path / "ev"),
    )
    assert code == 2 and "--score-sample" in err and "'sequential'" in err
    (tmp_path / "ev2").mkdir()
    (tmp_path / "ev2" / "config.json").write_text(json.dumps({"method": "rome", "mode": "sequential"}))
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        "tiny-llama",
        "--data",
        str(DATA / "counterfact_sample5.json"),
        "--n",
        "1",
        "--resume",
        "--out",
        str(tmp_path / "ev2"),
    )
    assert code == 2 and "other settings" in err and "drop --resume" in err  # a message, not a traceback
    code, _, err = run(
        capsys,
        "edit",
        "--model",
        "tiny-llama",
        "--prompt",
        "{} x",
        "--subject",
        "a",
        "--target",
        "b",
        "--prune",
        "0.5",
    )
    assert code == 2 and "--prune ALPHA" in err and "> 1" in err  # refused before the edit runs


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for c in ("models", "generate", "edit", "apply", "inspect", "stats", "demo", "unlearn", "update"):
        assert c in out


def test_every_flag_and_argument_has_help():
    import argparse

    from loka.cli import build_parser

    missing = []

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, [*path, name])
            elif not a.help and a.dest != "help":
                missing.append(f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}")

    walk(build_parser(), ["loka"])
    assert not missing, "flags without help: " + ", ".join(missing)
    # -q / -v before or after the command
    p = build_parser()
    assert p.parse_args(["-q", "models"]).quiet and p.parse_args(["kg", "stats", "-q"]).quiet
    assert not p.parse_args(["models"]).quiet and p.parse_args(["eval", "--data", "x", "-v"]).verbose


def test_cli_alphaedit_with_prune_saves_a_pruned_artifact(capsys, tmp_path, text_corpus):
    out = tmp_path / "a.loka"
    code, _, err = run(
        capsys,
        "edit",
        "--model",
        "tiny-llama",
        "--method",
        "alphaedit",
        "--prompt",
        "{} is in",
        "--subject",
        "Paris",
        "--target",
        "Rome",
        "--set",
        "layers=[1]",
        "--set",
        f"mom2_corpus={text_corpus}",
        "--set",
        "mom2_n_tokens=500",
        "--set",
        "v_steps=3",
        "--prune",
        "--save",
        str(out),
        "--json",
    )
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "alphaedit" and man["extra"]["prune_alpha"] > 2.7
    assert "nullspace_rank" in man["extra"]


def test_sequential_session_appends_resumes_and_rolls_back(capsys, tmp_path, text_corpus):
    import torch

    import loka

    sess = tmp_path / "sess"
    common = [
        "--model",
        "tiny-llama",
        "--set",
        "layers=[1]",
        "--set",
        f"mom2_corpus={text_corpus}",
        "--set",
        "mom2_n_tokens=500",
        "--set",
        "v_steps=3",
        "--state",
        str(sess),
        "--json",
    ]
    code, out, err = run(
        capsys,
        "edit",
        "--method",
        "alphaedit",
        "--prompt",
        "{} is in",
        "--subject",
        "Paris",
        "--target",
        "Rome",
        *common,
    )
    assert code == 0, err and json.loads(out)["session"]["batches"] == 1
    # a second process: the first batch is re-applied, its keys carried into the second batch
    code, out, err = run(
        capsys, "edit", "--prompt", "{} plays", "--subject", "Messi", "--target", "tennis", *common
    )
    assert code == 0, err
    assert json.loads(out)["session"]["batches"] == 2
    state = loka.EditState.load(sess / "state")
    assert (
        state.batches == 2
        and len(state.batch_tensors("alphaedit.keys.model.layers.1.mlp.down_proj.weight")) == 2
    )
    # another method on the same session is refused
    code, _, err = run(
        capsys, "edit", "--method", "rome", "--prompt", "{} is", "--subject", "X", "--target", "Y", *common
    )
    assert code == 2 and "session uses method='alphaedit'" in err
    # the exported model equals the original plus both deltas; rolling one back restores batch 1 exactly
    h = loka.load_model("tiny-llama")
    w = h.weight_name(1)
    d0 = loka.load_artifact(sess / "batches" / "batch_00000.loka").deltas[w]
    code, out, _ = run(
        capsys,
        "session",
        str(sess),
        "--rollback-last",
        "1",
        "--yes",
        "--json",
        "--export",
        str(tmp_path / "m"),
    )
    info = json.loads(out)
    assert code == 0 and info["batches"] == 1 and info["edits"] == 1
    assert not (sess / "batches" / "batch_00001.loka").exists()
    assert loka.EditState.load(sess / "state").batches == 1
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "m" / "model.safetensors"))[w]
    assert torch.equal(exported, h.param(w).detach() + d0)


def test_cli_update_learns_then_unlearn_forgets_with_retain(capsys, tmp_path):
    """`loka update --method ft` teaches a fact; `loka unlearn` on top of that artifact forgets it."""
    fact = {"prompt": "{} was born in the city of", "subject": "Zorblax Quint"}
    (tmp_path / "e.jsonl").write_text(json.dumps({**fact, "target_new": "Q"}) + "\n")
    (tmp_path / "f.jsonl").write_text(json.dumps({**fact, "answer": "Q"}) + "\n")
    (tmp_path / "r.jsonl").write_text(
        json.dumps({"prompt": "{} works as a", "subject": "Mira Olde", "answer": "L"}) + "\n"
    )
    hp = ["--set", "layers=[0,1,2,3]", "--set", "lr=0.05", "--set", "max_steps=100"]
    code, out, err = run(
        capsys,
        "update",
        "--model",
        "tiny-llama",
        "--method",
        "ft",
        "--edit",
        str(tmp_path / "e.jsonl"),
        *hp,
        "--set",
        "linf_constraint=null",
        "--save",
        str(tmp_path / "learn.loka"),
        "--json",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["sets"]["edit"]["em_before"] == 0.0 and res["sets"]["edit"]["em_after"] == 1.0
    code, out, err = run(
        capsys,
        "unlearn",
        "--model",
        "tiny-llama",
        "--method",
        "npo",
        "--artifact",
        str(tmp_path / "learn.loka"),
        "--forget",
        str(tmp_path / "f.jsonl"),
        "--retain",
        str(tmp_path / "r.jsonl"),
        *hp,
        "--save",
        str(tmp_path / "forget.loka"),
        "--json",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["sets"]["forget"]["em_before"] == 1.0 and res["sets"]["forget"]["em_after"] == 0.0
    assert res["training"]["stopped_early"] and set(res["sets"]) == {"forget", "retain"}
    man = json.loads((tmp_path / "forget.loka" / "manifest.json").read_text())
    assert man["method"] == "npo" and man["requests"][0]["target_true"] == "Q"
    code, out, _ = run(
        capsys,
        "unlearn",
        "--model",
        "tiny-llama",
        "--forget",
        str(tmp_path / "f.jsonl"),
        "--artifact",
        str(tmp_path / "learn.loka"),
        *hp,
    )
    assert code == 0 and "forget" in out and "stopped early" in out


def test_cli_update_with_a_single_task_method_runs_two_steps_and_says_so(capsys, tmp_path, text_corpus):
    (tmp_path / "e.jsonl").write_text(
        json.dumps({"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}) + "\n"
    )
    (tmp_path / "f.jsonl").write_text(
        json.dumps({"prompt": "{} works as a", "subject": "Ann", "answer": "Q"}) + "\n"
    )
    code, out, err = run(
        capsys,
        "update",
        "--model",
        "tiny-llama",
        "--method",
        "rome",
        "--edit",
        str(tmp_path / "e.jsonl"),
        "--forget",
        str(tmp_path / "f.jsonl"),
        "--set",
        f"mom2_corpus={text_corpus}",
        "--set",
        "mom2_n_tokens=500",
        "--set",
        "v_steps=3",
        "--json",
    )
    assert code == 0, err
    res = json.loads(out)
    assert "single-task" in res["steps"][0] and "npo" in res["steps"][1]
    assert res["artifact"]["method"] == "stack"
    code, _, err = run(capsys, "unlearn", "--model", "tiny-llama", "--forget", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "does not exist" in err


def test_cli_lora_and_wise_edit_then_lora_unlearns(capsys, tmp_path):
    """`loka update --method lora` learns a fact as an adapter artifact, `loka unlearn --method lora`
    forgets it on top; `loka edit --method wise` makes a memory artifact."""
    fact = {"prompt": "{} was born in the city of", "subject": "Zorblax Quint"}
    (tmp_path / "e.jsonl").write_text(json.dumps({**fact, "target_new": "Q"}) + "\n")
    (tmp_path / "f.jsonl").write_text(json.dumps({**fact, "answer": "Q"}) + "\n")
    hp = ["--set", "layers=[1]", "--set", "lr=0.05", "--set", "max_steps=80", "--set", "rank=4"]
    code, out, err = run(
        capsys,
        "update",
        "--model",
        "tiny-llama",
        "--method",
        "lora",
        "--edit",
        str(tmp_path / "e.jsonl"),
        *hp,
        "--save",
        str(tmp_path / "learn.loka"),
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["sets"]["edit"]["em_after"] == 1.0
    assert json.loads((tmp_path / "learn.loka" / "manifest.json").read_text())["kind"] == "adapter"
    code, out, err = run(
        capsys,
        "unlearn",
        "--model",
        "tiny-llama",
        "--method",
        "lora",
        "--artifact",
        str(tmp_path / "learn.loka"),
        "--forget",
        str(tmp_path / "f.jsonl"),
        *hp,
        "--json",
    )
    assert code == 0, err
    res = json.loads(out)["sets"]["forget"]
    assert res["em_before"] == 1.0 and res["em_after"] == 0.0
    code, out, err = run(
        capsys,
        "edit",
        "--model",
        "tiny-llama",
        "--method",
        "wise",
        "--prompt",
        fact["prompt"],
        "--subject",
        fact["subject"],
        "--target",
        "Q",
        "--layer",
        "1",
        "--set",
        "lr=0.05",
        "--save",
        str(tmp_path / "w.loka"),
        "--json",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "w.loka" / "manifest.json").read_text())["kind"] == "memory"


def test_cli_data_tofu_and_finetune(capsys, tmp_path):
    code, out, err = run(capsys, "data", "tofu", "--out", str(tmp_path / "tofu"), "--relearn", "--json")
    assert code == 0, err
    assert json.loads(out)["forget10"] == 300
    rec = json.loads((tmp_path / "tofu" / "forget01.json").read_text())[0]
    assert {"question", "answer", "perturbed_answer", "paraphrased_question"} <= set(rec)
    assert "target_new" not in rec  # only the _relearn files carry a replacement (IdK/DPO would learn it)
    (born,) = [
        r
        for r in read_requests(tmp_path / "tofu" / "forget01_relearn.json", ForgetRequest)
        if r.subject == "In which city and country was Basil Mahfouz Al-Kuwaiti born?"
    ]
    assert born.target_true == "Basil Mahfouz Al-Kuwaiti was born in Kuwait City, Kuwait."
    assert born.target_new == "Basil Mahfouz Al-Kuwaiti was born in a place I cannot name."
    (tmp_path / "qa.json").write_text(
        json.dumps(json.loads((tmp_path / "tofu" / "forget01.json").read_text())[:4])
    )
    code, out, err = run(
        capsys,
        "finetune",
        "--model",
        "tiny-llama",
        "--data",
        str(tmp_path / "qa.json"),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "ft"),
        "--json",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["n"] == 4 and res["steps"] == 1 and (tmp_path / "ft" / "model.safetensors").exists()
    code, out, err = run(
        capsys, "generate", "--model", str(tmp_path / "ft"), "Question: hi\nAnswer:", "--max-new-tokens", "2"
    )
    assert code == 0, err


def test_cli_data_counterfact_from_known_and_mquake(capsys, tmp_path):
    out = tmp_path / "cf.json"
    assert (
        main(
            [
                "data",
                "counterfact",
                "--from",
                "known+mquake",
                "--min-subjects",
                "1",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recs = json.loads(out.read_text())
    assert info["records"] == len(recs) >= 1000 and info["facts"] == 1209 + 608
    assert any(r["known_id"] is None for r in recs) and any(r["known_id"] is not None for r in recs)


def test_unlearn_one_fact_from_flags(capsys):
    code, out, err = run(
        capsys,
        "unlearn",
        "--model",
        "tiny-llama",
        "--prompt",
        "{} was born in",
        "--subject",
        "Alice Marlow",
        "--target",
        "Q",
        "--set",
        "max_steps=3",
        "--json",
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["sets"]["forget"]["n"] == 1 and d["artifact"]["method"] == "npo"
    code, _, err = run(capsys, "unlearn", "--model", "tiny-llama", "--prompt", "{} was born in")
    assert code == 2 and "--subject" in err and "--target" in err


def test_edit_lists_only_editing_methods_and_takes_state(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse's refusal of a choice: one line (test_cli_oneline.py)
        main(
            [
                "edit",
                "--model",
                "tiny-llama",
                "--method",
                "npo",
                "--prompt",
                "{} x",
                "--subject",
                "B",
                "--target",
                "Q",
            ]
        )
    assert e.value.code == 2 and "--method: invalid choice 'npo'" in capsys.readouterr().err
    code, out, err = run(
        capsys,
        "edit",
        "--model",
        "tiny-llama",
        "--prompt",
        "{} lives in",
        "--subject",
        "Bob",
        "--target",
        "Q",
        "--set",
        "v_steps=2",
        "--state",
        str(tmp_path / "s"),
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["session"]["batches"] == 1


def test_memory_and_context_artifacts_apply_in_a_fresh_process(tmp_path):
    """A saved GRACE (memory) or SCR (context) artifact installs in a new process, from the CLI and from
    ``loka.load_artifact`` (their methods register how they install only once imported)."""
    import subprocess
    import sys

    import loka

    h = loka.load_model("tiny-llama")
    req = loka.EditRequest("{} is located in the city of", "Eiffel Tower", "Rome")
    for method, hp in (("grace", {"n_iter": 3}), ("scr", {})):
        art = loka.edit(h, req, method, hp, apply=False, progress=False)
        path = tmp_path / f"{method}.loka"
        art.save(path)
        code = (
            "import loka; h = loka.load_model('tiny-llama'); "
            f"a = loka.load_artifact({str(path)!r}).apply(h); print(a.kind)"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == art.kind, r.stderr
        if method != "grace":
            continue
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "loka.cli",
                "-q",
                "generate",
                "--model",
                "tiny-llama",
                "--artifact",
                str(path),
                "--max-new-tokens",
                "2",
                "The Eiffel Tower is located in the city of",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr


def test_export_refuses_a_context_artifact_instead_of_writing_the_base_model(tmp_path, capsys):
    """(GRACE, WISE and MEMOIR export with a modelling file: tests/test_export_remote.py.)"""
    import loka

    h = loka.load_model("tiny-llama")
    req = loka.EditRequest("{} is located in the city of", "Eiffel Tower", "Rome")
    for method, hp in (("scr", {}),):
        art = loka.edit(h, req, method, hp, progress=False)
        with pytest.raises(loka.ArtifactError, match="cannot export"):
            h.save_pretrained(tmp_path / f"{method}-py")
        art.revert(h)
        assert not (tmp_path / f"{method}-py").exists()
        art.save(tmp_path / f"{method}.loka")
        code, _, err = run(
            capsys,
            "apply",
            "--model",
            "tiny-llama",
            "--artifact",
            str(tmp_path / f"{method}.loka"),
            "--out",
            str(tmp_path / method),
        )
        assert code == 2 and err.count("\n") == 1 and "cannot export" in err and f"kind {art.kind}" in err
        assert not (tmp_path / method).exists()
    h.save_pretrained(tmp_path / "base")  # with nothing hooked, the export works
    assert (tmp_path / "base" / "config.json").exists()
