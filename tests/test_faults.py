"""Faults a hostile or careless user causes, and what loka must do: refuse with one clear line, lose
nothing, never ship a broken update, never hang. Each test names the case it covers.

Cases needing a mount (a full disk, a read-only folder) use a small tmpfs and are skipped, with the
reason, where mounting is not allowed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import loka
from loka.artifact import Artifact, load_artifact, stack_artifacts
from loka.cli import main
from loka.methods.codebook import CodebookFolder
from loka.sequential import BatchFolder

REQ = loka.EditRequest("{} lives in the city of", "Alice Marlow", "Q")
ROME = {"layer": 1, "v_steps": 5, "mom2_n_tokens": 300}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> bool:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return bool(lines) and lines[-1].startswith("error: ") and "Traceback" not in err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny():
    return loka.load_model("tiny-llama")


@pytest.fixture(scope="module")
def art(tiny, tmp_path_factory, text_corpus):
    return loka.edit(
        tiny, REQ, "rome", {**ROME, "mom2_corpus": str(text_corpus)}, apply=False, progress=False
    )


def _weights(h) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in h.model.state_dict().items()}


def _same(h, w) -> bool:
    return all(torch.equal(v, w[k]) for k, v in h.model.state_dict().items())


EDIT = ["edit", "--model", "tiny-llama", "--prompt", "{} lives in", "--subject", "Alice", "--target", "Q"]


# -- 1. data lost: output paths that are not loka's ---------------------------------------------------
@pytest.mark.parametrize("extra", ["plain", "git"])
def test_1_save_onto_a_foreign_folder_is_refused_and_the_folder_kept(capsys, tmp_path, extra):
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "thesis.txt").write_text("precious")
    if extra == "git":
        (results / ".git").mkdir()
        (results / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    before = snapshot(results)
    for force in ([], ["--force"]):  # --force never replaces a folder loka did not write
        code, _, err = run(capsys, *EDIT, "--save", results, *force)
        assert code == 2 and one_line_error(err) and "did not write" in err
        assert snapshot(results) == before


def test_1_save_onto_an_existing_file_is_refused(capsys, tmp_path):
    f = tmp_path / "notes.loka"
    f.write_text("mine")
    code, _, err = run(capsys, *EDIT, "--save", f, "--force")
    assert code == 2 and "existing file" in err
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.loka"]


def test_1_apply_and_session_export_refuse_foreign_folders(capsys, tmp_path, art):
    art.save(tmp_path / "a.loka")
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(
        capsys, "apply", "--model", "tiny-llama", "--artifact", tmp_path / "a.loka", "--out", out, "--force"
    )
    assert code == 2 and "did not write" in err and (out / "keep.txt").read_text() == "precious"
    code, _, err = run(capsys, *EDIT, "--state", tmp_path / "s", "--set", "v_steps=2")
    assert code == 0, err
    code, _, err = run(capsys, "session", tmp_path / "s", "--export", out, "--force")
    assert code == 2 and "did not write" in err and sorted(os.listdir(out)) == ["keep.txt"]
    # an export loka wrote is replaced with --force, and only then
    code, _, err = run(
        capsys, "apply", "--model", "tiny-llama", "--artifact", tmp_path / "a.loka", "--out", tmp_path / "m2"
    )
    assert code == 0, err
    code, _, err = run(
        capsys, "apply", "--model", "tiny-llama", "--artifact", tmp_path / "a.loka", "--out", tmp_path / "m2"
    )
    assert code == 2 and "--force" in err
    code, _, err = run(capsys, "session", tmp_path / "s", "--export", tmp_path / "m2", "--force")
    assert code == 0, err


def test_1_force_replaces_only_a_loka_artifact(tmp_path, art):
    p = tmp_path / "a.loka"
    art.save(p)
    with pytest.raises(loka.LokaError, match="--force"):
        art.save(p)
    art.save(p, force=True)
    assert load_artifact(p).id == art.id


# -- 2. crash safety: kill -9 while saving, overwriting, computing statistics --------------------------
WRITER = textwrap.dedent(
    """
    import sys
    from loka.artifact import load_artifact
    a, b = load_artifact(sys.argv[1]), load_artifact(sys.argv[2])
    print("ready", flush=True)
    i = 0
    while True:
        (a if i % 2 else b).save(sys.argv[3], force=True)
        i += 1
    """
)


def _two_artifacts(tmp_path, art) -> tuple[Path, Path, set[str]]:
    other = Artifact.create(
        {k: v * 2 for k, v in art.deltas.items()},
        method="rome",
        hparams=art.manifest["hparams"],
        requests=art.manifest["requests"],
        handle=loka.load_model("tiny-llama"),
    )
    art.save(tmp_path / "a.loka", force=True)
    other.save(tmp_path / "b.loka", force=True)
    return tmp_path / "a.loka", tmp_path / "b.loka", {art.id, other.id}


def test_2_kill_during_overwrite_leaves_a_complete_artifact_and_no_litter(tmp_path, art):
    a, b, ids = _two_artifacts(tmp_path, art)
    target = tmp_path / "out" / "x.loka"
    load_artifact(a).save(target)
    rng = random.Random(0)
    for _ in range(8):
        p = subprocess.Popen([sys.executable, "-c", WRITER, a, b, target], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        p.kill()
        p.wait()
        assert load_artifact(target).id in ids  # old or new, complete, at every instant
    load_artifact(a).save(target, force=True)  # the next write cleans up what the killed ones left
    assert sorted(os.listdir(target.parent)) == ["x.loka"]


STATS_WRITER = textwrap.dedent(
    """
    import sys, loka
    from loka.corpus import JsonlCorpus
    h = loka.load_model("tiny-llama")
    print("ready", flush=True)
    loka.second_moments(h, [1, 2], JsonlCorpus(__import__("pathlib").Path(sys.argv[1])), 4000,
                        batch_size=4, checkpoint_every=2, progress=False)
    print("done", flush=True)
    """
)


def test_2_kill_during_statistics_leaves_no_broken_cache(tmp_path, text_corpus, monkeypatch):
    env = {**os.environ, "LOKA_HOME": str(tmp_path / "home")}
    monkeypatch.setenv("LOKA_HOME", str(tmp_path / "home"))
    for delay in (0.3, 0.8, 1.5):
        p = subprocess.Popen(
            [sys.executable, "-c", STATS_WRITER, text_corpus], stdout=subprocess.PIPE, text=True, env=env
        )
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.kill()
        p.wait()
    from loka.corpus import JsonlCorpus
    from loka.stats import second_moments, verify

    h = loka.load_model("tiny-llama")
    c = second_moments(h, [1, 2], JsonlCorpus(text_corpus), 4000, batch_size=4, progress=False)
    fresh = second_moments(h, [1, 2], JsonlCorpus(text_corpus), 4000, batch_size=4, progress=False)
    assert all(torch.equal(c[k], fresh[k]) for k in c) and all(
        bool(torch.isfinite(v).all()) for v in c.values()
    )
    files = [p for p in (tmp_path / "home" / "stats").rglob("*") if p.is_file()]
    assert not [p for p in files if "loka-tmp" in p.name]
    for f in files:
        if f.suffix == ".safetensors" and ".partial" not in f.name:
            verify(f)


# -- 3. sequential folders: a stored counter, gaps refused --------------------------------------------
def test_3_a_batch_folder_with_a_gap_is_refused_and_nothing_overwritten(tmp_path, art):
    book = tmp_path / "book"
    art.save(book / "batch_00000.loka")
    art.save(book / "batch_00002.loka")
    before = snapshot(book)
    with pytest.raises(loka.LokaError, match="batch 1 missing"):
        CodebookFolder(book).append(art)
    assert snapshot(book) == before


def test_3_batches_are_named_by_the_stored_counter(tmp_path, art, tiny):
    bf = BatchFolder(tmp_path / "seq")
    bf.append(art)
    other = stack_artifacts([art, art])
    bf.append(other)
    shutil.rmtree(bf.path(0))  # a batch deleted by hand
    with pytest.raises(loka.LokaError, match="listed but missing"):
        BatchFolder(tmp_path / "seq")
    bf2 = BatchFolder(tmp_path / "seq2")
    bf2.append(art)
    bf2.append(other)
    bf2.drop_last(1)
    assert bf2.append(other).name == "batch_00001.loka" and len(BatchFolder(tmp_path / "seq2")) == 2


# -- 4. one meaning of rollback, destructive ones confirmed ------------------------------------------
def test_4_rollback_has_one_meaning_and_asks_for_yes(capsys, tmp_path):
    s = tmp_path / "s"
    for subj in ("Alice", "Bob", "Carol"):
        code, _, err = run(
            capsys,
            "edit",
            "--model",
            "tiny-llama",
            "--prompt",
            "{} lives in",
            "--subject",
            subj,
            "--target",
            "Q",
            "--state",
            s,
            "--set",
            "v_steps=2",
        )
        assert code == 0, err
    before = snapshot(s)
    code, _, err = run(capsys, "session", s, "--rollback", "1")
    assert code == 2 and "--rollback-last" in err and "--keep-first" in err
    code, _, err = run(capsys, "session", s, "--rollback-last", "1")  # not interactive: needs --yes
    assert code == 2 and "--yes" in err and snapshot(s) == before
    code, out, err = run(capsys, "session", s, "--rollback-last", "1", "--yes", "--json")
    assert code == 0 and json.loads(out)["batches"] == 2
    code, out, err = run(capsys, "session", s, "--keep-first", "1", "--yes", "--json")
    assert code == 0 and json.loads(out)["batches"] == 1


# -- 5. a diverged update is refused, weights untouched ----------------------------------------------
@pytest.mark.parametrize(
    "method,bad",
    [
        ("gd", {"lr": 1e37}),
        ("gd", {"alpha": 1e38}),
        ("npo", {"lr": 1e30}),
        ("ft", {"lr": 1e30, "linf_constraint": 1e9}),
    ],
)
def test_5_a_diverged_training_update_is_refused(capsys, tmp_path, tiny, method, bad):
    f = loka.ForgetRequest("{} was born in", "Alice", None, target_true="Q")
    r = loka.RetainRequest("{} lives in", "Bob", "R")
    w = _weights(tiny)
    with pytest.raises(loka.DivergenceError, match="diverged|exploded|NaN"):
        loka.update(
            tiny,
            [] if method != "ft" else [REQ],
            [f] if method != "ft" else [],
            [r],
            method=method,
            hparams={**bad, "stop_forget_em": -1, "layers": [0, 1]},
            progress=False,
        )
    assert _same(tiny, w) and not tiny.model.__dict__.get("_loka_applied")
    fj, rj = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    fj.write_text(json.dumps({"prompt": "{} was born in", "subject": "Alice", "target_true": "Q"}) + "\n")
    rj.write_text(json.dumps({"prompt": "{} lives in", "subject": "Bob", "target_new": "R"}) + "\n")
    if method != "ft":
        sets = [f"{k}={v}" for k, v in bad.items()]
        code, _, err = run(
            capsys,
            "unlearn",
            "--model",
            "tiny-llama",
            "--method",
            method,
            "--forget",
            fj,
            "--retain",
            rj,
            *[x for s_ in sets for x in ("--set", s_)],
            "--set",
            "stop_forget_em=-1",
            "--save",
            tmp_path / "x.loka",
        )
        assert code == 2 and one_line_error(err) and not (tmp_path / "x.loka").exists()


def test_5_every_trainer_checks_its_loss():
    from loka.methods.base import check_loss

    with pytest.raises(loka.LokaError, match="step 3"):
        check_loss(torch.tensor(float("nan")), "npo", 3)
    src = Path(loka.__file__).parent / "methods"
    for name in ("train.py", "grace.py", "wise.py"):
        assert "check_loss(" in (src / name).read_text(), name


# -- 6. integrity ---------------------------------------------------------------------------------------
def _edit_manifest(p: Path, fn) -> None:
    m = json.loads((p / "manifest.json").read_text())
    fn(m)
    (p / "manifest.json").write_text(json.dumps(m))


def test_6_manifest_without_model_or_with_wrong_shapes_or_copied_id_is_refused(tmp_path, art, tiny):
    cases = {
        "model": lambda m: m.pop("model"),
        "params": lambda m: next(iter(m["params"].values())).update(shape=[1, 1]),
        "id": lambda m: m.update(id="0123456789abcdef"),
        "dtype": lambda m: next(iter(m["params"].values())).update(dtype="float16"),
        "format_version": lambda m: m.update(format_version="2"),
        "hparams": lambda m: m["hparams"].update(v_steps=999),
    }
    for name, fn in cases.items():
        p = tmp_path / f"{name}.loka"
        art.save(p)
        _edit_manifest(p, fn)
        with pytest.raises(loka.ArtifactError):
            load_artifact(p)


def test_6_stack_refuses_parts_already_applied(tiny, art):
    w = _weights(tiny)
    art.apply(tiny)
    try:
        with pytest.raises(loka.ArtifactError, match="already applied|shares"):
            stack_artifacts([art, art]).apply(tiny)
    finally:
        art.revert(tiny)
    assert _same(tiny, w)
    s = stack_artifacts([art])
    s.apply(tiny)
    try:
        with pytest.raises(loka.ArtifactError):
            art.apply(tiny)  # applied inside the stack already
    finally:
        s.revert(tiny)


def test_6_a_replaced_batch_or_hand_edited_state_is_refused(capsys, tmp_path, art):
    s = tmp_path / "s"
    for subj in ("Alice", "Bob"):
        code, _, err = run(
            capsys,
            "edit",
            "--model",
            "tiny-llama",
            "--method",
            "alphaedit",
            "--prompt",
            "{} lives in",
            "--subject",
            subj,
            "--target",
            "Q",
            "--state",
            s,
            "--set",
            "v_steps=2",
            "--set",
            "layers=[1]",
            "--set",
            "mom2_n_tokens=300",
        )
        assert code == 0, err
    saved = snapshot(s)
    shutil.rmtree(s / "batches" / "batch_00001.loka")
    art.save(s / "batches" / "batch_00001.loka")  # a valid artifact, but not this batch
    code, _, err = run(capsys, "session", s)
    assert code == 2 and "recorded" in err
    shutil.rmtree(s)
    for rel, data in saved.items():
        (s / rel).parent.mkdir(parents=True, exist_ok=True)
        (s / rel).write_bytes(data)
    st = json.loads((s / "state" / "state.json").read_text())
    st["meta"]["batches"] = 1
    (s / "state" / "state.json").write_text(json.dumps(st))
    code, _, err = run(capsys, "session", s)
    assert code == 2 and one_line_error(err)


# -- 7. hyperparameter domains ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,bad,field",
    [
        ("rome", {"clamp_norm_factor": float("nan")}, "clamp_norm_factor"),
        ("rome", {"clamp_norm_factor": -1}, "clamp_norm_factor"),
        ("rome", {"v_steps": 0}, "v_steps"),
        ("memit", {"layers": [1, 1]}, "layers"),
        ("memit", {"layers": [2, 1]}, "layers"),
        ("memit", {"layers": []}, "layers"),
        ("rome", {"v_lr": -1}, "v_lr"),
        ("rome", {"v_lr": float("nan")}, "v_lr"),
        ("rome", {"mom2_n_tokens": 0}, "mom2_n_tokens"),
        ("rome", {"context_length": -1}, "context_length"),
        ("rome", {"v_batch_size": 0}, "v_batch_size"),
        ("rome", {"v_dtype": "float8"}, "v_dtype"),
        ("npo", {"lr": 0}, "lr"),
        ("loka", {"mapping": "hash"}, "mapping"),
    ],
)
def test_7_hyperparameters_outside_their_domain_are_refused(tiny, tmp_path, monkeypatch, method, bad, field):
    monkeypatch.setenv("LOKA_HOME", str(tmp_path / "home"))
    with pytest.raises(loka.ConfigError, match=field):
        loka.edit(tiny, REQ, method, bad, progress=False)
    assert not (tmp_path / "home" / "stats").exists() or not list(
        (tmp_path / "home" / "stats").rglob("*.safetensors")
    )


def test_7_every_default_and_shipped_config_is_inside_its_domains():
    import dataclasses
    from importlib import resources

    for name, cls in loka.METHODS.items():
        hp = cls.hparams_cls
        hp.from_dict(dataclasses.asdict(hp()), where=f"{name} defaults")
        folder = resources.files("loka") / "configs" / name
        for f in folder.iterdir() if folder.is_dir() else []:
            data = {
                k: v
                for k, v in json.loads(f.read_text()).items()
                if not k.endswith("_frac") and k != "extends"
            }
            hp.from_dict(data, where=f"configs/{name}/{f.name}")


# -- 8. requests -----------------------------------------------------------------------------------------
def test_8_malformed_lists_are_refused_and_a_true_target_warned(caplog):
    for bad in ({"a": 1}, 7, "one string"):
        with pytest.raises(loka.RequestError, match="paraphrases"):
            loka.request_from_record(
                {"prompt": "{} x", "subject": "B", "target_new": "Q", "paraphrases": bad}
            )
    with caplog.at_level(logging.WARNING, logger="loka.requests"):
        loka.EditRequest("{} lives in", "Bob", "Paris", target_true="paris")
    assert "equals target_true" in caplog.text


# -- 9. one line, exit 2, for every bad input -------------------------------------------------------------
def test_9_braces_in_a_prompt_are_text_for_every_method(tiny):
    r = loka.EditRequest("{} said {hello} in", "Bob", "Q")
    for method, hp in (
        ("rome", {"layer": 1, "v_steps": 2}),
        ("wise", {"layer": 1, "n_iter": 2}),
        ("grace", {"layer": 1, "n_iter": 2}),
    ):
        loka.edit(tiny, r, method, hp, apply=False, progress=False)


def test_9_a_prompt_longer_than_the_model_is_refused(tiny):
    with pytest.raises(loka.RequestError, match="positions"):
        loka.edit(tiny, loka.EditRequest("word " * 3000 + "{} is", "Bob", "Q"), "rome", progress=False)


@pytest.mark.parametrize(
    "content,expect",
    [
        (b"\xff\xfe{bad", "UTF-8"),
        (b"[" * 100000 + b"]" * 100000, "deep"),
        (json.dumps({"requested_rewrite": None}).encode(), "requested_rewrite"),
        (
            json.dumps({"prompt": "{} x", "subject": "B", "target_new": "Q", "paraphrases": 7}).encode(),
            "paraphrases",
        ),
        (b"", "no records"),
    ],
)
def test_9_bad_request_files_give_one_line(capsys, tmp_path, content, expect):
    f = tmp_path / "r.json"
    f.write_bytes(content)
    code, _, err = run(capsys, "edit", "--model", "tiny-llama", "--requests", f)
    assert code == 2 and one_line_error(err) and expect.lower() in err.lower()


def test_9_paths_and_option_values_give_one_line(capsys, tmp_path, art):
    folder = tmp_path / "dir"
    folder.mkdir()
    bad_json = tmp_path / "h.json"
    bad_json.write_text("{oops")
    a_list = tmp_path / "l.json"
    a_list.write_text("[1, 2]")
    art.save(tmp_path / "a.loka")
    (tmp_path / "sess").mkdir()
    (tmp_path / "sess" / "session.json").write_text('{"format": "loka-session"}')
    (tmp_path / "sess2").mkdir()
    (tmp_path / "sess2" / "session.json").write_text("{")
    cases = [
        (["edit", "--model", "tiny-llama", "--requests", folder], "folder"),
        ([*EDIT, "--hparams", bad_json], "JSON"),
        ([*EDIT, "--hparams", a_list], "object"),
        ([*EDIT, "--hparams", folder], "folder"),
        (["edit", "--model", "tiny-llama", "--prompt", "{} x", "--subject", "", "--target", "Q"], "subject"),
        (["edit", "--model", "tiny-llama", "--prompt", "{} x", "--subject", "B", "--target", ""], "target"),
        (["session", tmp_path / "sess"], "lacks"),
        (["session", tmp_path / "sess2"], "JSON"),
        (["report", tmp_path / "a.loka"], "loka eval --out"),
        (["inspect", folder], "not an artifact"),
        (["inspect", tmp_path / "missing.loka"], "not an artifact"),
        (["generate", "--model", "tiny-llama", "--artifact", bad_json, "x"], "artifact folder"),
        (["kg", "stats", "--graph", bad_json], "JSON"),
        (["eval", "--model", "tiny-llama", "--data", folder, "--out", tmp_path / "ev"], "folder"),
        (["stats", "--model", "tiny-llama", "--layers", "1", "--corpus", tmp_path / "nope.txt"], "not found"),
        (["update", "--model", "tiny-llama", "--method", "npo"], "--forget"),
    ]
    for argv, expect in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and one_line_error(err), (argv, err)
        assert expect.lower() in err.lower(), (argv, err)


def test_9_report_on_an_eval_run_says_what_it_reads(capsys, tmp_path):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "summary.json").write_text(json.dumps({"method": "rome", "post": {}}))
    code, _, err = run(capsys, "report", tmp_path / "ev")
    assert code == 2 and "loka kg run" in err


def _mount_tmpfs(path: Path, size: str = "20k") -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    if not _mount_tmpfs(d):
        pytest.skip("a full-disk test needs to mount a small tmpfs (root and a mount permission)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_9_a_full_disk_gives_one_line_and_leaves_no_partial_artifact(capsys, small_disk, art):
    code, _, err = run(capsys, *EDIT, "--set", "v_steps=2", "--save", small_disk / "a.loka")
    assert code == 2 and one_line_error(err) and ("full" in err or "space" in err)
    assert os.listdir(small_disk) == []


def test_9_a_read_only_folder_is_refused_before_the_edit_runs(capsys, small_disk, monkeypatch):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    import loka.api

    def must_not_run(*a, **k):
        raise AssertionError("the edit ran although its output could not be written")

    monkeypatch.setattr(loka.api, "edit", must_not_run)
    code, _, err = run(capsys, *EDIT, "--save", small_disk / "a.loka")
    assert code == 2 and one_line_error(err) and "read-only" in err.lower()


@pytest.mark.parametrize("kind", ["missing", "folder", "not utf-8", "invalid json", "deep json"])
def test_9_every_command_answers_a_bad_input_with_one_line(capsys, tmp_path, kind):
    """Walk every (sub)command of the parser and give each option or argument that names a file or
    folder to read a bad one of ``kind``: one line, exit status 2, no traceback."""
    from loka.cli import build_parser

    bad = tmp_path / "bad.json"
    if kind == "folder":
        bad.mkdir()
    elif kind == "not utf-8":
        bad.write_bytes(b'{"prompt": "caf\xe9 {}"}')
    elif kind == "invalid json":
        bad.write_text('{"prompt": ')
    elif kind == "deep json":
        bad.write_text("[" * 100000 + "]" * 100000)
    reads = {
        "requests",
        "forget",
        "retain",
        "edit",
        "hparams",
        "data",
        "artifact",
        "folder",
        "runs",
        "from",
        "source",
        "graph",
        "known_file",
        "tofu_dir",
        "src",
        "known",
        "mquake",
        "sequence",
        "corpus",
    }
    walked = []

    def walk(parser, prefix):
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if subs:
            for name, sp in subs[0].choices.items():
                walk(sp, [*prefix, name])
            return
        options = [s for b in parser._actions for s in b.option_strings]
        for a in parser._actions:
            if (
                a.dest not in reads
                or a.choices
                or not (a.option_strings or a.dest in ("folder", "runs", "artifact"))
            ):
                continue
            if kind == "folder" and a.dest in (
                "tofu_dir",
                "src",
                "sequence",
                "folder",
                "runs",
                "artifact",
                "corpus",
            ):
                continue  # these take a folder: an empty one is a different fault (covered elsewhere)
            argv = list(prefix)
            for b in parser._actions:  # the other required options, with harmless values
                if b is a or not (b.required or (not b.option_strings and b.dest != "help")):
                    continue
                if b.option_strings:
                    argv += [
                        b.option_strings[0],
                        "1" if b.type is int else (b.choices and next(iter(b.choices))) or "x",
                    ]
                else:
                    argv += [str(tmp_path / "nothing-here")] if b.dest in reads else ["x"]
            argv += [a.option_strings[0], str(bad)] if a.option_strings else [str(bad)]
            if "--out" in options and "--out" not in argv:
                argv += ["--out", str(tmp_path / "out" / "_".join(prefix))]
            if "--model" in options and "--model" not in argv:
                argv += ["--model", "tiny-llama"]
            code, _, err = run(capsys, *argv)
            assert code == 2 and one_line_error(err), (argv, err)
            walked.append(" ".join(prefix) + " " + a.dest)

    walk(build_parser(), [])
    assert len(walked) >= 15, walked


# -- 10. hangs: links to devices, FIFOs -----------------------------------------------------------------
@pytest.mark.parametrize(
    "target,which",
    [
        ("/dev/zero", "manifest.json"),
        ("/dev/zero", "deltas.safetensors"),
        ("fifo", "manifest.json"),
        ("fifo", "deltas.safetensors"),
    ],
)
def test_10_links_and_fifos_in_an_artifact_are_refused_at_once(tmp_path, art, target, which):
    p = tmp_path / "a.loka"
    art.save(p)
    (p / which).unlink()
    if target == "fifo":
        os.mkfifo(p / which)
    else:
        os.symlink(target, p / which)
    code = "import sys\nfrom loka.cli import main\nsys.exit(main(['inspect', sys.argv[1]]))"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and one_line_error(r.stderr), r.stderr
    assert "regular file" in r.stderr or "symbolic link" in r.stderr
    assert time.time() - t0 < 60


# -- 11. concurrency ---------------------------------------------------------------------------------------
READER = textwrap.dedent(
    """
    import sys, time
    from loka.artifact import load_artifact
    from loka.errors import LokaError
    ok = bad = 0
    t = time.time()
    while time.time() - t < float(sys.argv[2]):
        try:
            load_artifact(sys.argv[1]); ok += 1
        except LokaError as e:
            bad += 1; print(e, file=sys.stderr)
    print(ok, bad)
    """
)
SAVER = textwrap.dedent(
    """
    import sys, time
    from loka.artifact import load_artifact
    a = load_artifact(sys.argv[1])
    n = 0
    t = time.time()
    while time.time() - t < float(sys.argv[3]):
        a.save(sys.argv[2], force=True); n += 1
    print(n)
    """
)


def test_11_concurrent_writers_and_a_reader_see_only_whole_artifacts(tmp_path, art):
    a, b, ids = _two_artifacts(tmp_path, art)
    target = tmp_path / "shared.loka"
    load_artifact(a).save(target)
    secs = "6"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAVER, src, target, secs],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src in (a, b)
    ]
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, target, secs],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert int(out.strip()) > 0
    out, err = reader.communicate(timeout=120)
    ok, bad = map(int, out.split())
    assert bad == 0 and ok > 0, err
    assert load_artifact(target).id in ids
    assert sorted(os.listdir(tmp_path)) == ["a.loka", "b.loka", "shared.loka"]


def test_11_two_processes_computing_the_same_statistics(tmp_path, text_corpus):
    env = {**os.environ, "LOKA_HOME": str(tmp_path / "home")}
    code = STATS_WRITER.replace("4000", "3000")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, text_corpus],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "done" in out, err
    files = [p for p in (tmp_path / "home" / "stats").rglob("*.safetensors")]
    assert len(files) == 2 and not [p for p in (tmp_path / "home").rglob("*loka-tmp*")]


def test_3_a_foreign_folder_is_not_taken_as_a_codebook(capsys, tmp_path):
    book = tmp_path / "mine"
    book.mkdir()
    (book / "notes.txt").write_text("precious")
    e = tmp_path / "e.jsonl"
    e.write_text(json.dumps({"prompt": "{} lives in", "subject": "A", "target_new": "Q"}) + "\n")
    code, _, err = run(
        capsys, "update", "--model", "tiny-llama", "--method", "loka", "--edit", e, "--state", book
    )
    assert code == 2 and "did not write" in err and sorted(os.listdir(book)) == ["notes.txt"]
