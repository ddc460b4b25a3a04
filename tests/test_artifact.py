import json

import pytest
import torch

import loka
from loka import ArtifactError, load_artifact, stack_artifacts


def _state(h):
    return {k: v.clone() for k, v in h.model.state_dict().items()}


def _same(h, state):
    return all(torch.equal(v, state[k]) for k, v in h.model.state_dict().items())


HP = {"mom2_n_tokens": 500, "v_steps": 5}


@pytest.fixture
def tiny(text_corpus):
    h = loka.load_model("tiny-llama")
    h.hp = {**HP, "mom2_corpus": str(text_corpus)}
    return h


def _edit(h, subject="Eiffel Tower", target="Rome", method="rome", **kw):
    req = loka.EditRequest("{} is located in", subject, target)
    return loka.edit(h, req, method, {**h.hp, **kw}, progress=False)


def test_edit_applies_and_revert_restores_bit_for_bit(tiny):
    before = _state(tiny)
    art = _edit(tiny)
    assert not _same(tiny, before)
    art.revert(tiny)
    assert _same(tiny, before)


def test_save_load_roundtrip_gives_identical_logits(tiny, tmp_path):
    art = _edit(tiny)
    enc = tiny.tokenizer("Eiffel Tower is located in", return_tensors="pt")
    edited = tiny.model(**enc).logits
    art.save(tmp_path / "a.loka")
    art.revert(tiny)
    loaded = load_artifact(tmp_path / "a.loka")
    assert loaded.id == art.id and loaded.manifest["method"] == "rome"
    assert loaded.manifest["model"]["hash"] == tiny.model_hash
    assert loaded.manifest["requests"][0]["subject"] == "Eiffel Tower"
    loaded.apply(tiny)
    assert torch.equal(tiny.model(**enc).logits, edited)


def test_corrupt_artifact_is_refused(tiny, tmp_path):
    art = _edit(tiny, apply=False) if False else _edit(tiny)
    p = art.save(tmp_path / "a.loka")
    data = bytearray((p / "deltas.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (p / "deltas.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(p)
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(p)
    with pytest.raises(ArtifactError, match="not an artifact folder"):
        load_artifact(tmp_path / "missing.loka")


def test_artifact_for_another_model_is_refused(tiny, tmp_path):
    art = _edit(tiny)
    art.revert(tiny)
    other = loka.load_model("tiny-llama", seed=3)
    with pytest.raises(ArtifactError, match="made for model"):
        art.apply(other)
    art.apply(other, force=True)  # same shapes: allowed when forced


def test_save_is_atomic_and_leaves_no_temp_files(tiny, tmp_path):
    art = _edit(tiny)
    art.save(tmp_path / "a.loka")
    with pytest.raises(loka.LokaError, match="pass --force"):
        art.save(tmp_path / "a.loka")  # an existing artifact is replaced only when asked
    art.save(tmp_path / "a.loka", force=True)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.loka"]
    assert json.loads((tmp_path / "a.loka" / "manifest.json").read_text())["tensors_sha256"]


def test_stacking_and_out_of_order_revert_are_exact(tiny):
    base = _state(tiny)
    a = _edit(tiny, "Eiffel Tower", "Rome")
    after_a = _state(tiny)
    b = _edit(tiny, "Colosseum", "Paris")
    a.revert(tiny)  # revert the first while the second stays applied
    b.revert(tiny)
    assert _same(tiny, base)
    s = stack_artifacts([a, b])
    assert set(s.manifest["parents"]) == {a.id, b.id}
    s.apply(tiny)
    for k, d in a.deltas.items():
        assert torch.allclose(tiny.model.get_parameter(k), base[k] + d + b.deltas[k], atol=1e-6)
    s.revert(tiny)
    assert _same(tiny, base)
    a.apply(tiny)
    assert _same(tiny, after_a)
    with pytest.raises(ArtifactError, match="already applied"):
        a.apply(tiny)


def test_exception_mid_edit_leaves_weights_untouched(tiny, monkeypatch):
    import loka.methods.memit as memit

    before = _state(tiny)
    calls = {"n": 0}
    real = memit.memit_solve

    def failing(*a, **k):  # the first layer is written, then the second solve fails
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(memit, "memit_solve", failing)
    with pytest.raises(RuntimeError, match="boom"):
        loka.edit(
            tiny,
            loka.EditRequest("{} is in", "Paris", "Rome"),
            "memit",
            {**tiny.hp, "layers": [1, 2]},
            progress=False,
        )
    assert calls["n"] == 2
    assert _same(tiny, before)


def test_apply_false_returns_artifact_without_touching_the_model(tiny):
    before = _state(tiny)
    art = loka.edit(
        tiny, loka.EditRequest("{} is in", "Paris", "Rome"), "rome", tiny.hp, apply=False, progress=False
    )
    assert _same(tiny, before)
    assert art.deltas


def test_same_update_twice_has_the_same_id_and_older_formats_still_verify(tiny, tmp_path):
    """The id hashes what the update is, not how long the method ran (format 3); artifacts written in
    format 2 (whose ids hashed the phase timings) still load, verified by their own rule."""
    from loka.artifact import content_id

    req = loka.EditRequest("{} is located in", "Eiffel Tower", "Rome")
    a, b = (loka.edit(tiny, req, "memit", tiny.hp, progress=False, apply=False) for _ in range(2))
    assert a.manifest["extra"]["timings"] != b.manifest["extra"]["timings"]  # the runs took different time
    assert a.id == b.id
    assert a.manifest["format_version"] == 3

    old = dict(a.manifest, format_version=2)
    old["id"] = content_id(old, a.deltas)
    assert old["id"] != a.id  # format 2 hashed the timings
    v2 = loka.Artifact(a.deltas, old).save(tmp_path / "v2")
    assert load_artifact(v2).id == old["id"]
    m = json.loads((v2 / "manifest.json").read_text())
    m["extra"]["timings"]["values"] += 1.0  # in format 2 the timings are part of the id
    (v2 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="not derived from its content"):
        load_artifact(v2)
