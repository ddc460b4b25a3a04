"""The Python API does what the CLI does: the device choice, loading from the local Hugging Face
cache, ``report=True`` (the CLI's before/after rows and table) and ``update`` returning an artifact."""

from __future__ import annotations

import pytest
import torch

import loka
from loka import env
from loka.cli import build_parser, main
from loka.result import EditResult, format_table

REQ = loka.EditRequest(
    "{} is located in the city of",
    "Eiffel Tower",
    "R",  # " R": two byte tokens, which ROME can raise on a random model
    target_true="Paris",
    paraphrases=["Where is the Eiffel Tower? It is in the city of"],
    neighborhood=["The Louvre is located in the city of"],
)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.delenv("LOKA_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch reports two CUDA GPUs (nothing is moved to them)."""
    monkeypatch.delenv("LOKA_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _weights(h) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in h.model.state_dict().items()}


def _same(h, w) -> bool:
    return all(torch.equal(v, w[k]) for k, v in h.model.state_dict().items())


# -- device ---------------------------------------------------------------------------------------
def test_device_argument_beats_the_environment_which_beats_auto(monkeypatch, two_gpus):
    assert env.device() == torch.device("cuda") and env.device("auto") == torch.device("cuda")
    assert env.device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setenv("LOKA_DEVICE", "cpu")
    assert env.device() == torch.device("cpu") and env.device("auto") == torch.device("cpu")
    assert env.device("cuda") == torch.device("cuda")
    monkeypatch.setenv("LOKA_DEVICE", "cuda:1")
    assert env.device("cpu") == torch.device("cpu") and env.device() == torch.device("cuda:1")
    with pytest.raises(loka.ConfigError, match=r"device='cuda:2' \(--device cuda:2\).*cuda:0..cuda:1"):
        env.device("cuda:2")


def test_cpu_when_no_gpu_and_cuda_refused_in_one_line(monkeypatch, no_cuda):
    assert env.device() == torch.device("cpu") and env.device("auto") == torch.device("cpu")
    with pytest.raises(loka.ConfigError, match=r"device='cuda' \(--device cuda\): torch sees no CUDA GPU"):
        loka.load_model("tiny-llama", device="cuda")
    for bad in ("gpu", "cuda:x", "cpu:0"):
        with pytest.raises(loka.ConfigError, match="give cpu, cuda, cuda:N or auto"):
            env.device(bad)
    monkeypatch.setenv("LOKA_DEVICE", "cuda")
    with pytest.raises(loka.ConfigError, match="LOKA_DEVICE='cuda'"):
        loka.load_model("tiny-llama")


def test_the_model_is_placed_on_the_chosen_device(monkeypatch):
    """``load_model`` puts the weights where :func:`loka.env.device` says (``meta`` stands in for a GPU)."""
    asked = []

    def fake(want=None):
        asked.append(want)
        return torch.device("meta")

    monkeypatch.setattr(env, "device", fake)
    h = loka.load_model("tiny-llama", device="cuda:0")
    assert asked == ["cuda:0"] and h.device.type == "meta"
    assert all(p.device.type == "meta" for p in h.model.parameters())
    assert loka.load_model("tiny-llama", device="cpu").device.type == "meta"  # env.device decides alone


def test_every_command_that_loads_a_model_takes_device(capsys, no_cuda):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    seen = 0
    for name, sub in commands.items():
        subs = [sub]
        if sub._subparsers is not None:
            subs = list(sub._subparsers._group_actions[0].choices.values())
        for s in subs:
            dests = {a.dest for a in s._actions}
            if dests & {"model", "known_by"}:
                seen += 1
                assert "device" in dests, name
                help_text = next(a.help for a in s._actions if a.dest == "device")
                assert "cuda" in help_text and "LOKA_DEVICE" in help_text
    assert seen >= 10
    code = main(["generate", "--model", "tiny-llama", "--device", "cuda", "--max-new-tokens", "1", "Hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--device cuda" in err
    assert main(["generate", "--model", "tiny-llama", "--device", "cpu", "--max-new-tokens", "1", "Hi"]) == 0


# -- the local Hugging Face cache -----------------------------------------------------------------
def _fake_hub(root, repo_id: str, handle, rev: str = "0123456789abcdef", ref: bool = True):
    folder = root / f"models--{repo_id.replace('/', '--')}"
    snap = folder / "snapshots" / rev
    handle.model.save_pretrained(snap)
    handle.tokenizer.save_pretrained(snap)
    if ref:
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(rev)
    return snap


def test_a_hub_id_loads_from_the_local_cache_without_network(tmp_path, monkeypatch):
    tiny = loka.load_model("tiny-llama", seed=3)
    other = loka.load_model("tiny-llama", seed=4)
    snap = _fake_hub(tmp_path, "org-x/Tiny.Llama-1", tiny)
    _fake_hub(tmp_path, "org-x/Tiny.Llama-1", other, rev="ffff", ref=False)  # an older, unreferenced snapshot
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    h = loka.load_model("org-x/Tiny.Llama-1", device="cpu")
    assert h.name == "org-x/Tiny.Llama-1" and h.source == str(snap)
    want = tiny.model.state_dict()
    got = h.model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert h.tokenizer("Paris")["input_ids"] == tiny.tokenizer("Paris")["input_ids"]

    (tmp_path / "models--org-x--Tiny.Llama-1" / "refs" / "main").unlink()
    newest = loka.load_model("org-x/Tiny.Llama-1")  # no ref: the newest snapshot
    assert torch.equal(newest.model.lm_head.weight, other.model.lm_head.weight)

    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(loka.ModelError) as e:
        loka.load_model("org-x/Tiny.Llama-1")
    msg = str(e.value)
    assert "\n" not in msg and "unknown model 'org-x/Tiny.Llama-1'" in msg
    assert f"not in the local Hugging Face cache (HF_HUB_CACHE={tmp_path / 'home' / 'hub'}" in msg


# -- report=True ----------------------------------------------------------------------------------
@pytest.fixture
def tiny_hp(text_corpus):
    """ROME settings that raise a two-token target on a random tiny model (tests/test_methods_tiny.py)."""
    return {
        "mom2_n_tokens": 1000,
        "mom2_corpus": str(text_corpus),
        "layer": 2,
        "clamp_norm_factor": 50.0,
        "v_steps": 30,
        "v_weight_decay": 0.0,
        "kl_factor": 0.0,
    }


def test_edit_report_shows_p_new_rising_in_the_cli_table(tiny_hp):
    h = loka.load_model("tiny-llama")
    w0 = _weights(h)
    res = loka.edit(h, REQ, "rome", tiny_hp, progress=False, report=True)
    assert isinstance(res, EditResult) and isinstance(res.artifact, loka.Artifact)
    assert [r["kind"] for r in res.before] == ["edit", "paraphrase", "neighbourhood"]
    assert [r["prompt"] for r in res.after] == [REQ.text, *REQ.paraphrases, *REQ.neighborhood]
    edit_before, edit_after = res.before[0], res.after[0]
    assert edit_after["p_target_new"] > 1.3 * edit_before["p_target_new"]  # ~0.5 nat or more
    strip = lambda rows: [{k: v for k, v in r.items() if k != "request"} for r in rows]  # noqa: E731
    assert res.table() == str(res) == format_table(REQ, strip(res.before), strip(res.after))
    assert "P(new) before" in res.table() and res.steps == []
    res.artifact.revert(h)
    assert _same(h, w0)

    quiet = loka.edit(h, REQ, "rome", tiny_hp, progress=False, apply=False, report=True)  # measured, not kept
    assert _same(h, w0) and quiet.artifact.deltas.keys() == res.artifact.deltas.keys()
    assert quiet.after[0]["p_target_new"] == pytest.approx(edit_after["p_target_new"], rel=1e-5)
    plain = loka.edit(h, REQ, "rome", tiny_hp, progress=False)  # the default is unchanged
    assert isinstance(plain, loka.Artifact) and plain.deltas.keys() == res.artifact.deltas.keys()
    plain.revert(h)


def test_unlearn_report_rows_are_the_forgotten_answers_probability():
    h = loka.load_model("tiny-llama")
    f = loka.ForgetRequest("{} plays the", "Miro Tal", None, target_true="oboe")
    r = loka.RetainRequest("{} lives in", "Bob", "Oslo")
    hp = {"layers": [0, 1, 2, 3], "lr": 0.05, "max_steps": 5, "stop_forget_em": -1}
    res = loka.unlearn(h, [f], [r], "npo", hp, progress=False, report=True)
    assert [(x["set"], x["answer"]) for x in res.before] == [("forget", "oboe"), ("retain", "Oslo")]
    s = res.summary()
    assert list(s) == ["forget", "retain"] and s["forget"]["p_norm_after"] < s["forget"]["p_norm_before"]
    assert res.table().splitlines()[0].split()[:2] == ["set", "n"]
    res.artifact.revert(h)


# -- update returns an Artifact -------------------------------------------------------------------
def test_update_returns_an_artifact_with_its_steps_and_reverts_bit_for_bit(tiny_hp, caplog):
    h = loka.load_model("tiny-llama")
    w0 = _weights(h)
    f = loka.ForgetRequest("{} plays the", "Miro Tal", None, target_true="oboe")
    r = loka.RetainRequest("{} lives in", "Bob", "Oslo")
    with caplog.at_level("INFO", logger="loka"):
        art = loka.update(h, [REQ], [f], [r], method="rome", hparams=tiny_hp, progress=False)
    assert isinstance(art, loka.Artifact) and not _same(h, w0)
    assert len(art.steps) == 2 and "rome is single-task" in art.steps[0] and "npo forgot" in art.steps[1]
    assert all(s in caplog.text for s in art.steps)
    art.revert(h)
    assert _same(h, w0)

    res = loka.update(h, [REQ], [f], [r], method="rome", hparams=tiny_hp, progress=False, report=True)
    assert [x["set"] for x in res.before] == ["edit", "forget", "retain"]
    assert res.table().splitlines()[:2] == art.steps == res.steps
    res.artifact.revert(h)
    assert _same(h, w0)
