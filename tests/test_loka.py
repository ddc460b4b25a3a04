"""LOKA: the codebook's pieces on hand-built cases (MGDA, conflict score, LSH, K-means, an untrained
memory is the identity) and the method end to end on a tiny model (edits and forgets at once, the
router keeps retained queries on the base model, conflict-aware allocation, ablation flags,
sequential LSH updates that never re-assign old knowledge, save / load / revert, the CLI)."""

from __future__ import annotations

import json

import pytest
import torch

import loka
from loka import EditRequest, ForgetRequest, RetainRequest
from loka.forgetting.metrics import answer_stats
from loka.methods.codebook import (
    Codebook,
    CodebookFolder,
    LokaModel,
    conflict_score,
    kmeans,
    lsh_hash,
    mgda_two,
    routed_groups,
    state_from_artifact,
)

from .conftest import answer_em as _em
from .conftest import prompt_logits as _logits

HP = {"layer": 1, "lr": 0.05, "n_iter": 40, "router_epochs": 10}
E1 = EditRequest("{} was born in the city of", "Zorblax Quint", "Q")
E2 = EditRequest("{} works as a", "Perla Vint", "Z")
R1 = RetainRequest("{} lives in", "Anna Bell", "K")


def _forget_known(h, prompt, subject, answer="V"):
    """Teach the tiny model a fact (an applied FT artifact; LOKA's base is then that model) and
    return the forget request for it, so there is something to forget."""
    ft = {"layers": [0, 1, 2, 3], "lr": 0.05, "max_steps": 100, "linf_constraint": None}
    loka.edit(h, EditRequest(prompt, subject, answer), "ft", ft, progress=False)
    assert _em(h, prompt.replace("{}", subject), answer) == 1.0
    return ForgetRequest(prompt, subject, None, target_true=answer)


# -- pieces ---------------------------------------------------------------------------------------
def test_mgda_two_is_the_min_norm_point():
    a, d = mgda_two(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0]))  # normalised: e1, e2 → α = 1/2
    assert a == pytest.approx(0.5) and torch.allclose(d, torch.tensor([0.5, 0.5]))
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    a, d = mgda_two(g1, g2)
    n1, n2 = g1, g2 / g2.norm()
    grid = torch.linspace(0, 1, 10001)
    norms = torch.stack([(t * n1 + (1 - t) * n2).norm() for t in grid])
    assert a == pytest.approx(float(grid[norms.argmin()]), abs=1e-3)
    a, d = mgda_two(torch.tensor([2.0, 0.0]), torch.tensor([5.0, 0.0]))  # same direction: α = 1/2, d = ĝ
    assert a == 0.5 and torch.allclose(d, torch.tensor([1.0, 0.0]))


def test_conflict_score_and_hashing():
    assert conflict_score([-0.2, 0.5, -0.1, 0.3]) == 0.5 and conflict_score([]) == 0.0
    planes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    assert lsh_hash(x, planes).tolist() == [3, 2, 1, 0]  # Σ 2^j 1[R_j·x ≥ 0]
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    labels, cent = kmeans(emb, 2)
    assert labels[0] == labels[1] != labels[2] == labels[3] and cent.shape == (2, 2)


def test_untrained_memory_is_the_base_model():
    h = loka.load_model("tiny-llama")
    base = _logits(h, E1.text)
    d = h.config.hidden_size
    book = Codebook(
        torch.zeros((1, *h.weight(1).shape)),
        torch.randn(1, d),
        1,
        h.spec.block_path(1),
        h.spec.mlp_out_path(1),
    ).attach(h.model)
    try:
        assert torch.equal(_logits(h, E1.text), base)  # auto-routed to memory 0 (no router): Δ = 0
        with book.select(0):
            assert torch.equal(_logits(h, E1.text), base)
    finally:
        book.remove()


# -- the method -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_update():
    h = loka.load_model("tiny-llama")
    F1 = _forget_known(h, "{} plays the", "Miro Tal")
    w0 = {k: v.clone() for k, v in h.model.state_dict().items()}
    before = {t: _logits(h, t) for t in (E1.text, R1.text, F1.text)}
    art = loka.update(h, [E1, E2], [F1], [R1], method="loka", hparams=HP, progress=False)
    return h, w0, F1, before, art, art.steps


def test_loka_edits_and_forgets_at_once(tiny_update):
    h, w0, F1, before, art, steps = tiny_update
    assert art.kind == "memory" and art.method == "loka" and "one optimisation" in steps[0]
    assert _em(h, E1.text, "Q") == 1.0 and _em(h, E2.text, "Z") == 1.0
    assert _em(h, F1.text, F1.target_true) == 0.0
    for k, v in h.model.state_dict().items():  # the base weights never change
        assert torch.equal(v, w0[k]), k
    x = art.manifest["extra"]
    assert x["router"]["train_accuracy"] == 1.0 and len(x["memories"]) == art.deltas["loka.deltas"].shape[0]
    book = LokaModel(h).codebook
    assert LokaModel(h).route([R1.text]) == [-1]  # the router keeps a retained query on the base model
    assert torch.equal(_logits(h, R1.text), before[R1.text])
    assert all(j >= 0 for j in LokaModel(h).route([E1.text, E2.text, F1.text]))
    assert book.router_probs(["Cats often sleep for most of the day."])[0] < 0.5
    # loka's scoring routes on the prompt alone: the retained fact scores as on the base model
    lp = loka.target_logprobs(h, [E1.text, R1.text], ["Q", "K"])
    art.revert(h)
    try:
        base = loka.target_logprobs(h, [E1.text, R1.text], ["Q", "K"])
    finally:
        art.apply(h)
    assert (
        lp[0]["logprob"] > base[0]["logprob"] + 1.0
    )  # (grouped by memory, so batch shapes differ: 1e-5 noise)
    assert (
        lp[1]["logprob"] == pytest.approx(base[1]["logprob"], abs=1e-4)
        and lp[1]["top_token"] == base[1]["top_token"]
    )


def test_loka_generation_routes_like_scoring(tiny_update):
    h = tiny_update[0]
    prompts = [E1.text, R1.text, E2.text]
    via_groups = loka.generate(h, prompts, max_new_tokens=3)
    tok = h.tokenizer
    tok.padding_side = "left"
    try:  # raw HF generate: the hooks route each row at the prefill and keep the memory
        enc = tok(prompts, return_tensors="pt", padding=True)
        seqs = LokaModel(h).generate(**enc, do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = "right"
    raw = [tok.decode(s[enc["input_ids"].shape[1] :], skip_special_tokens=True) for s in seqs]
    assert raw == via_groups and via_groups[0].startswith(" Q")


def test_loka_save_load_revert(tiny_update, tmp_path):
    h, _, F1, before, art, _ = tiny_update
    edited = _logits(h, E1.text)
    art.save(tmp_path / "c.loka")
    art.revert(h)
    assert torch.equal(_logits(h, E1.text), before[E1.text])
    loaded = loka.load_artifact(tmp_path / "c.loka").apply(h)
    with pytest.raises(loka.LokaError, match="already applied"):
        loka.load_artifact(tmp_path / "c.loka").apply(h)
    assert torch.equal(_logits(h, E1.text), edited)
    loaded.revert(h)
    assert torch.equal(_logits(h, F1.text), before[F1.text])
    assert routed_groups(h, ["x"]) == [(None, None, [0])]
    art.apply(h)  # leave the fixture as it was


def test_conflict_rule_and_ablations():
    h = loka.load_model("tiny-llama")
    same = ForgetRequest("{} was born in the city of", "Zorblax Quint", None, target_true="Q")
    # identical (x, y) to edit and to forget: every gradient pair is opposite → score 1 → separate memories
    art = loka.update(
        h,
        [E1],
        [same],
        [],
        method="loka",
        hparams={**HP, "k": 1, "router": False},
        apply=False,
        progress=False,
    )
    c = art.manifest["extra"]["conflict"]
    assert c[0]["score"] == 1.0 and c[0]["memories"] == "separate"
    assert sorted(m["task"] for m in art.manifest["extra"]["memories"]) == ["edit", "forget"]
    F1 = _forget_known(h, "{} plays the", "Miro Tal")
    art = loka.update(
        h,
        [E1, E2],
        [F1],
        [],
        method="loka",
        apply=False,
        progress=False,
        hparams={**HP, "storage": "dense", "conflict": "shared", "router": False},
    )
    mem = art.manifest["extra"]["memories"]
    assert len(mem) == 1 and mem[0]["task"] == "shared" and 0.0 <= mem[0]["mgda_alpha"] <= 1.0
    assert "router.head.weight" not in art.deltas
    art = loka.update(
        h,
        [E1, E2],
        [F1],
        [],
        method="loka",
        apply=False,
        progress=False,
        hparams={**HP, "storage": "sparse", "router": False},
    )
    assert len(art.manifest["extra"]["memories"]) == 3
    for bad, field in [
        ({"mapping": "tree"}, "mapping"),
        ({"k": 0}, "k"),
        ({"storage": "x"}, "storage"),
        ({"router_threshold": 2}, "router_threshold"),
        ({"match_threshold": -0.5}, "match_threshold"),
    ]:
        with pytest.raises(loka.LokaError, match=field):
            loka.update(h, [E1], [], [], method="loka", hparams={**HP, **bad}, progress=False)


def test_edit_stop_nll_trains_edit_memories_past_the_first_exact_match():
    """``edit_stop_nll`` > 0: an edit memory keeps training after its answer first becomes the argmax,
    until the mean answer NLL is below the bound (a margin for other phrasings); 0 stops at once."""
    h = loka.load_model("tiny-llama")
    mem = {}
    for stop in (0.0, 2.0):
        art = loka.update(
            h,
            [E1, E2],
            [],
            [],
            method="loka",
            apply=False,
            progress=False,
            hparams={**HP, "k": 1, "router": False, "edit_stop_nll": stop},
        )
        (mem[stop],) = art.manifest["extra"]["memories"]
    assert mem[0.0]["target_met"] and mem[2.0]["target_met"]
    assert mem[2.0]["steps"] > mem[0.0]["steps"] and mem[2.0]["edit_nll"] <= 2.0 < mem[0.0]["edit_nll"]


def test_match_threshold_keeps_unrelated_queries_on_the_base_model():
    """Without a router every query reaches a memory; the retrieval gate (``match_threshold``, 0.65 by
    default with encoder keys) sends a query that is not close to any updated query to the base model,
    bit for bit, while the updated queries and a near paraphrase keep their memory. 0 turns it off."""
    from loka.methods.codebook import LokaModel, encoder_embeddings

    h = loka.load_model("tiny-llama")
    near, far = "Zorblax Quint was born in the town of", "The chemical symbol of gold is"
    e = torch.nn.functional.normalize(encoder_embeddings([E1.text, near, far, E2.text]), dim=-1)
    assert float(e[1] @ e[0]) > 0.65 > max(float(e[2] @ e[0]), float(e[2] @ e[3]))
    base = _logits(h, far)
    for gate in (None, 0.0):
        art = loka.update(
            h,
            [E1, E2],
            [],
            [],
            method="loka",
            progress=False,
            hparams={**HP, "k": 1, "router": False, "match_threshold": gate},
        )
        try:
            assert art.manifest["extra"]["match_threshold"] == (0.65 if gate is None else 0.0)
            assert LokaModel(h).route([E1.text, E2.text, near]) == [0, 0, 0]
            routed_far = LokaModel(h).route([far])[0]
            assert _em(h, E1.text, "Q") == 1.0
            if gate is None:
                assert routed_far == -1 and torch.equal(_logits(h, far), base)
            else:
                assert routed_far == 0 and not torch.equal(_logits(h, far), base)
        finally:
            art.revert(h)


def test_edit_contexts_train_each_edit_after_context_templates():
    """``edit_contexts`` = n: each edit also trains after n of the model's context templates (ROME/MEMIT's
    augmentation), so the memory stops only when the new answer holds after every one of them."""
    from loka.methods.templates import context_templates

    h = loka.load_model("tiny-llama")
    ctx = [t for t in context_templates(h) if t != "{}"][:2]
    lp = {}
    for n in (0, 2):
        art = loka.update(
            h,
            [E1, E2],
            [],
            [],
            method="loka",
            apply=False,
            progress=False,
            hparams={**HP, "k": 1, "router": False, "edit_stop_nll": 2.0, "edit_contexts": n},
        )
        (mem,) = art.manifest["extra"]["memories"]
        assert mem["target_met"]
        art.apply(h)
        try:
            texts = [c.replace("{}", e.text) for e in (E1, E2) for c in ctx]
            answers = [e.target_new for e in (E1, E2) for _ in ctx]
            lp[n] = [r["logprob"] for r in loka.target_logprobs(h, texts, answers)]
            if n:
                assert all(_em(h, t, a) == 1.0 for t, a in zip(texts, answers))
        finally:
            art.revert(h)
    assert sum(lp[2]) > sum(lp[0])
    with pytest.raises(loka.LokaError, match="edit_contexts"):
        loka.update(h, [E1], [], [], method="loka", hparams={**HP, "edit_contexts": -1}, progress=False)


def test_gate_tasks_stops_pushing_a_forget_target_already_met():
    """In a shared memory that keeps training for its edits (``edit_stop_nll``), ``gate_tasks`` leaves the
    forget loss out of the steps where no forget answer is the argmax: the forgotten answer is pushed
    down less far (less over-forgetting) and the edits still reach their bound."""
    h = loka.load_model("tiny-llama")
    F1 = _forget_known(h, "{} plays the", "Miro Tal")
    lp, mem = {}, {}
    for gate in (False, True):
        art = loka.update(
            h,
            [E1, E2],
            [F1],
            [],
            method="loka",
            apply=False,
            progress=False,
            hparams={
                **HP,
                "storage": "dense",
                "conflict": "shared",
                "router": False,
                "edit_stop_nll": 2.0,
                "gate_tasks": gate,
            },
        )
        (mem[gate],) = art.manifest["extra"]["memories"]
        art.apply(h)
        try:
            lp[gate] = loka.target_logprobs(h, [F1.text], [F1.target_true])[0]["logprob"]
        finally:
            art.revert(h)
    assert all(m["task"] == "shared" and m["target_met"] and m["edit_nll"] <= 2.0 for m in mem.values())
    assert lp[True] > lp[False] + 1.0


def test_forget_stop_nll_pushes_a_forgotten_answer_past_the_first_flipped_token():
    """``forget_stop_nll`` > 0: a forget memory keeps training after its answer stops being an exact match
    until the answer's mean per-token NLL reaches the bound (a long answer stops matching once one token
    flips); 0 stops at the first flip. Negative values are refused."""
    h = loka.load_model("tiny-llama")
    F1 = _forget_known(h, "{} plays the", "Miro Tal", answer="VW")
    lp, mem = {}, {}
    for stop in (0.0, 8.0):
        art = loka.update(
            h,
            [],
            [F1],
            [],
            method="loka",
            apply=False,
            progress=False,
            hparams={**HP, "k": 1, "router": False, "lr": 0.003, "n_iter": 80, "forget_stop_nll": stop},
        )
        (mem[stop],) = art.manifest["extra"]["memories"]
        art.apply(h)
        try:
            lp[stop] = loka.target_logprobs(h, [F1.text], [F1.target_true])[0]["logprob"]
        finally:
            art.revert(h)
    assert mem[0.0]["target_met"] and mem[8.0]["target_met"]
    assert mem[8.0]["steps"] > mem[0.0]["steps"]
    assert mem[8.0]["forget_nll"] >= 8.0 > mem[0.0]["forget_nll"]
    assert lp[8.0] < lp[0.0] - 3.0
    with pytest.raises(loka.LokaError, match="forget_stop_nll"):
        loka.update(h, [], [F1], [], method="loka", hparams={**HP, "forget_stop_nll": -1}, progress=False)


def test_sequential_lsh_keeps_old_memories(tmp_path):
    h = loka.load_model("tiny-llama")
    hp = {**HP, "mapping": "lsh", "lsh_bits": 3, "router": False}
    folder = CodebookFolder(tmp_path / "book")
    a1 = loka.update(h, [E1, E2], [], [R1], method="loka", hparams=hp, apply=False, progress=False)
    folder.append(a1)
    E3 = EditRequest("{} speaks the language", "Kell Dorv", "W")
    a2 = loka.update(
        h, [E3], [], [], method="loka", hparams=hp, state=folder.state(), apply=False, progress=False
    )
    folder.append(a2)
    x1, x2 = a1.manifest["extra"], a2.manifest["extra"]
    assert [i["group"] for i in x2["data"]["items"][:2]] == [
        i["group"] for i in x1["data"]["items"]
    ]  # not re-assigned
    assert x2["batch"] == 1 and len(x2["data"]["items"]) == 3 and len(x2["data"]["retain"]) == 1
    new_group = x2["data"]["items"][2]["group"]
    assert x2["retrained_groups"] == [new_group]
    g1, g2 = a1.deltas["loka.groups"].tolist(), a2.deltas["loka.groups"].tolist()
    for j, g in enumerate(g1):  # every memory of an untouched bucket is carried over bit for bit
        if g != new_group:
            assert torch.equal(a2.deltas["loka.deltas"][g2.index(g)], a1.deltas["loka.deltas"][j])
    assert torch.equal(a2.deltas["loka.planes"], a1.deltas["loka.planes"])
    a2.apply(h)
    try:
        em = [r["em"] for r in answer_stats(h, [E1.text, E3.text], ["Q", "W"])]  # routed on the prompt
        assert em == [1.0, 1.0]
    finally:
        a2.revert(h)
    assert folder.rollback(1) == 1 and len(folder.batches()) == 1
    assert state_from_artifact(folder.latest()).batches == 1


def test_cli_update_loka_with_state(tmp_path, capsys):
    from loka.cli import main

    edits, forget, retain = tmp_path / "e.jsonl", tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    edits.write_text(json.dumps({"prompt": E1.prompt, "subject": E1.subject, "target_new": "Q"}) + "\n")
    forget.write_text(
        json.dumps({"prompt": "{} plays the", "subject": "Miro Tal", "target_true": "V"}) + "\n"
    )
    retain.write_text(json.dumps({"prompt": R1.prompt, "subject": R1.subject, "target_new": "K"}) + "\n")
    sets = [f"--set={k}={v}" for k, v in {**HP, "router_epochs": 2}.items()]
    args = [
        "update",
        "--model",
        "tiny-llama",
        "--method",
        "loka",
        "--edit",
        str(edits),
        "--forget",
        str(forget),
        "--retain",
        str(retain),
        "--state",
        str(tmp_path / "book"),
        "--set=mapping=lsh",
        *sets,
    ]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sets"]["edit"]["em_after"] == 1.0 and out["artifact"]["method"] == "loka"
    assert len(out["codebook"]["memories"]) >= 2 and out["codebook"]["router"]["train_accuracy"] > 0.5
    assert any("batch 1" in s for s in out["steps"])
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "batch 2" in text and "codebook of" in text
    assert (
        main(["update", "--method", "loka", "--state", str(tmp_path / "book"), "--keep-first", "1", "--yes"])
        == 0
    )
    assert "1 batch(es) deleted" in capsys.readouterr().out
    assert (
        main(["update", "--method", "npo", "--state", str(tmp_path / "book"), "--forget", str(forget)]) == 2
    )
    assert "--method loka" in capsys.readouterr().err


def test_two_step_update_with_a_memory_editor_is_a_bundle(tmp_path):
    """GRACE edits, then NPO forgets: a memory artifact and a weight delta cannot be summed, so the
    update returns a bundle that applies both in order and reverts both exactly."""
    h = loka.load_model("tiny-llama")
    F1 = _forget_known(h, "{} plays the", "Miro Tal")
    before = {t: _logits(h, t) for t in (E1.text, F1.text)}
    w0 = {k: v.clone() for k, v in h.model.state_dict().items()}
    art = loka.update(h, [E1], [F1], [R1], method="grace", hparams={"layer": 1}, progress=False)
    assert (
        art.kind == "bundle" and [p.method for p in art.parts()] == ["grace", "npo"] and len(art.steps) == 2
    )
    assert _em(h, E1.text, "Q") == 1.0 and _em(h, F1.text, F1.target_true) == 0.0
    edited = _logits(h, E1.text)
    art.save(tmp_path / "b.loka")
    art.revert(h)
    for k, v in h.model.state_dict().items():
        assert torch.equal(v, w0[k]), k
    assert torch.equal(_logits(h, E1.text), before[E1.text]) and torch.equal(
        _logits(h, F1.text), before[F1.text]
    )
    loaded = loka.load_artifact(tmp_path / "b.loka").apply(h)
    assert torch.equal(_logits(h, E1.text), edited)
    loaded.revert(h)
    assert torch.equal(_logits(h, E1.text), before[E1.text])


def test_router_and_key_share_one_encoder_pass():
    """The router fine-tunes MiniLM's top layer only, so the key embedding continues its forward
    from there through the base's top layer: the same probabilities and keys as two full passes, and
    codebook routing with MiniLM keys gives the ids of router-then-nearest."""
    from loka.encoder import load_encoder
    from loka.methods.codebook import train_router

    router, _ = train_router(
        ["The Eiffel Tower is in", "Alan Turing was born in"],
        ["Cats often sleep for most of the day.", "Water boils at"],
        epochs=2,
    )
    assert router.first_trained_layer() == 5
    base = load_encoder()
    texts = ["The Eiffel Tower is in", "Water boils at", "A much longer sentence about the weather in spring"]
    probs, emb = router.probs_and_embeddings(texts, base)
    assert torch.allclose(probs, router.probs(texts), atol=1e-5)
    assert torch.allclose(emb, base.encode(texts), atol=1e-5)
    book = Codebook(
        torch.zeros(3, 4, 4),
        base.encode(["Water", "Eiffel Tower", "weather"]),
        1,
        "b",
        "o",
        router=router,
        router_threshold=float(probs.median()),
        key_source="encoder",
    )
    want = torch.where(probs >= book.router_threshold, book.nearest(base.encode(texts)), torch.tensor(-1))
    assert torch.equal(book.route_encoder(texts), want) and (want >= 0).any() and (want < 0).any()
