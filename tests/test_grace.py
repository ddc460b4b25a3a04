"""GRACE: the codebook edits the prompt it was trained on, leaves other inputs bit-identical, and
applies / reverts / saves like every artifact (tiny models of every family)."""

from __future__ import annotations

import pytest
import torch

import loka

from .conftest import TINY
from .conftest import answer_em as _em
from .conftest import prompt_logits as _logits

HP = {"layer": 1, "eps": 0.2, "lr": 0.5, "n_iter": 60}
A = loka.EditRequest("{} was born in the city of", "Zorblax Quint", "Q")
B = loka.EditRequest("{} works as a", "Perla Vint", "Z")


@pytest.mark.parametrize("name", TINY)
def test_grace_edits_its_prompt_only_and_reverts_exactly(name, tmp_path):
    h = loka.load_model(name)
    other = "Mira Olde likes to eat"
    before_a, before_other = _logits(h, A.text), _logits(h, other)
    w_before = {k: v.clone() for k, v in h.model.state_dict().items()}
    art = loka.edit(
        h, [A, B], "grace", {**HP, "eps": 0.05}, progress=False
    )  # random tiny models: keys sit close
    assert art.kind == "memory" and art.manifest["extra"]["entries"] == 4  # 2 answer positions each
    assert _em(h, A.text, "Q") == 1.0 and _em(h, B.text, "Z") == 1.0
    assert torch.equal(_logits(h, other), before_other)  # outside every ball: untouched, bit for bit
    for k, v in h.model.state_dict().items():  # a codebook changes no weight
        assert torch.equal(v, w_before[k]), k
    edited = _logits(h, A.text)
    art.save(tmp_path / "g.loka")
    art.revert(h)
    assert torch.equal(_logits(h, A.text), before_a)
    loaded = loka.load_artifact(tmp_path / "g.loka").apply(h)
    assert torch.equal(_logits(h, A.text), edited)
    loaded.revert(h)
    assert torch.equal(_logits(h, A.text), before_a)


def test_grace_codebook_rules():
    """Same prompt, new answer: overwritten; nearby keys with other answers: radii split so that no
    two balls of different labels overlap; nearby keys with the same answer: the ball grows."""
    h = loka.load_model("tiny-llama")
    again = loka.EditRequest(A.prompt, A.subject, "R")
    art = loka.edit(h, [A, again], "grace", HP, apply=False, progress=False)
    ex = art.manifest["extra"]
    assert (
        ex["entries"] == 2
        and ex["overwritten"] == 2
        and [x.split("\x1f")[0] for x in ex["labels"]] == ["R", "R"]
    )
    art.apply(h)
    assert _em(h, A.text, "R") == 1.0 and _em(h, A.text, "Q") == 0.0
    art.revert(h)
    big = {**HP, "eps": 10.0}  # radii large enough that the balls of the two prompts overlap
    near = loka.EditRequest("{} was born in the town of", "Zorblax Quint", "W")
    art = loka.edit(h, [A, near], "grace", big, apply=False, progress=False)
    keys, eps, labels = art.deltas["grace.keys"], art.deltas["grace.eps"], art.manifest["extra"]["labels"]
    assert art.manifest["extra"]["split"] >= 1
    d = torch.cdist(keys, keys)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            if labels[i] != labels[j]:
                assert float(eps[i] + eps[j]) <= float(d[i, j]) * (1 + 1e-5), (i, j)
    same = loka.EditRequest("{} was born in the town of", "Zorblax Quint", "Q")
    art = loka.edit(h, [A, same], "grace", big, apply=False, progress=False)
    ex = art.manifest["extra"]
    assert ex["covered"] >= 1 and ex["entries"] == 4 - ex["covered"]  # a covered key adds no entry


def test_grace_artifact_is_refused_on_a_model_without_its_module():
    h = loka.load_model("tiny-llama")
    art = loka.edit(h, A, "grace", HP, apply=False, progress=False)
    art.manifest["extra"]["module"] = "model.layers.99.mlp.down_proj"
    with pytest.raises(loka.ArtifactError, match="does not have"):
        art.apply(h)


@pytest.mark.parametrize(
    "bad,field", [({"eps": 0.0}, "eps"), ({"n_iter": 0}, "n_iter"), ({"layer": 9}, "layer")]
)
def test_grace_refuses_bad_hyperparameters(bad, field):
    h = loka.load_model("tiny-llama")
    with pytest.raises((loka.LokaError, loka.ModelError), match=field):
        loka.edit(h, A, "grace", {**HP, **bad}, progress=False)
