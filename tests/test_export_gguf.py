"""GGUF export: the file loads back with transformers and answers as the in-memory model (weights within
the type's rounding, q/k permuted as llama.cpp does, the tokenizer carried over), an edit survives f16
and q8_0, memory artifacts and files loka did not write are refused, and the CLI's exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import loka
from loka.cli import main
from loka.export.gguf import MARKER_KEY, export_gguf, load_gguf, read_marker

from .conftest import prompt_logits

#: no old answer: on a random tiny model success is the strict test, "R" is the greedy answer
REQ = loka.EditRequest("{} is located in", "Eiffel Tower", "R", paraphrases=["Where is Eiffel Tower? In"])
TEXTS = ["The Eiffel Tower is located in", "naïve café — 東京 ✓", "a<|endoftext|>b  c\n\td"]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


#: fine-tuning all four layers of the random tiny LLaMA makes "R" its greedy answer (ROME does not get there)
FT = {"layers": [0, 1, 2, 3], "lr": 0.05, "max_steps": 100, "linf_constraint": None}


def _no_leftovers(folder) -> bool:
    return not any(".loka-tmp-" in p.name for p in folder.iterdir())


def test_f16_file_loads_back_with_the_same_weights_logits_and_tokenizer(tmp_path):
    h = loka.load_model("tiny-llama")
    res = export_gguf(h, tmp_path / "t.gguf", quant="f16")
    assert res.verified and res.metadata_from == "config" and res.tensor_types == {"F16": 30, "F32": 9}
    assert res.tokenizer_identical and res.top1_agreement == 1.0 and res.max_logit_diff < 0.02
    back = load_gguf(tmp_path / "t.gguf")
    mine, theirs = h.model.state_dict(), back.model.state_dict()
    assert mine.keys() == theirs.keys()
    for k, w in mine.items():  # f16 keeps 11 significant bits: within half an ulp of float16
        tol = torch.finfo(torch.float16).eps / 2 * w.abs() + 1e-7
        assert torch.all((theirs[k] - w).abs() <= tol), k
    for t in TEXTS:  # q/k permuted and un-permuted exactly: the same logits up to f16 rounding
        assert torch.allclose(prompt_logits(back, t), prompt_logits(h, t), atol=2e-2)
        assert back.tokenizer(t)["input_ids"] == h.tokenizer(t)["input_ids"]
    assert read_marker(tmp_path / "t.gguf")["base_hash"] == h.model_hash
    assert _no_leftovers(tmp_path)


def test_quantised_files_stay_close_and_keep_norms_in_float32(tmp_path):
    h = loka.load_model("tiny-llama")
    q8 = export_gguf(h, tmp_path / "q8.gguf", quant="q8_0")
    assert q8.tensor_types == {"Q8_0": 30, "F32": 9} and q8.top1_agreement == 1.0
    back = load_gguf(tmp_path / "q8.gguf")
    for t in TEXTS:
        a, b = prompt_logits(h, t), prompt_logits(back, t)
        assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert torch.equal(back.model.model.norm.weight, h.model.model.norm.weight)  # F32, bit for bit
    q4 = export_gguf(h, tmp_path / "q4.gguf", quant="q4_1", verify=False)
    assert q4.tensor_types == {"Q4_1": 29, "Q8_0": 1, "F32": 9}  # the output matrix in Q8_0, as llama.cpp
    assert not q4.verified and q4.bytes < q8.bytes < (tmp_path / "q8.gguf").stat().st_size * 2


def test_an_edit_survives_f16_and_q8_0(tmp_path):
    h = loka.load_model("tiny-llama")
    art = loka.edit(h, REQ, "ft", FT, progress=False)
    for quant in ("f16", "q8_0"):
        res = export_gguf(h, tmp_path / f"{quant}.gguf", quant=quant)
        [check] = res.requests
        assert check.artifact == art.id and check.text == REQ.text and check.target == "R"
        assert check.before and check.after and res.survived == [check] and res.lost == []
        assert res.summary().startswith(f"1 of 1 edits survived {quant} (rewrite), paraphrases")
        back = load_gguf(tmp_path / f"{quant}.gguf")
        top = back.tokenizer.decode(prompt_logits(back, REQ.text)[0, -1].argmax())
        assert top == h.tokenizer.decode(prompt_logits(h, REQ.text)[0, -1].argmax())
        assert read_marker(tmp_path / f"{quant}.gguf")["artifacts"] == [
            {"id": art.id, "method": "ft", "kind": "weight-delta"}
        ]


def test_a_lost_edit_is_counted_and_named_in_a_warning(tmp_path, caplog):
    from loka.export.gguf import verify_gguf

    h = loka.load_model("tiny-llama")
    res = export_gguf(h, tmp_path / "base.gguf", quant="f16", verify=False)  # the file holds no edit
    loka.edit(h, REQ, "ft", FT, progress=False)
    verify_gguf(h, tmp_path / "base.gguf", res)  # checked against the edited model in memory
    [check] = res.requests
    assert check.before and not check.after and res.lost == [check] and res.survived == []
    assert res.summary().startswith("0 of 1 edits survived f16 (rewrite)")
    assert any("did not survive f16" in r.message and REQ.text in r.message for r in caplog.records)


def test_memory_artifacts_are_refused_and_nothing_is_written(tmp_path, capsys):
    h = loka.load_model("tiny-llama")
    art = loka.edit(h, REQ, "grace", {"n_iter": 2}, progress=False)
    with pytest.raises(loka.ArtifactError, match="cannot export"):
        export_gguf(h, tmp_path / "g.gguf")
    assert list(tmp_path.iterdir()) == []
    art.save(tmp_path / "g.loka")
    code, out, err = run(
        capsys,
        "export",
        "--model",
        "tiny-llama",
        "--artifact",
        str(tmp_path / "g.loka"),
        "--out",
        str(tmp_path / "g.gguf"),
    )
    assert code == 2 and err.count("\n") == 1 and "cannot export" in err and "kind memory" in err
    assert not (tmp_path / "g.gguf").exists() and _no_leftovers(tmp_path)


def test_gemma3_layout_from_a_source_gguf_norms_stored_as_one_plus_w(tmp_path, monkeypatch):
    """A source GGUF of the tiny Gemma 3 (its metadata, its tensor names, zero tensors) stands in for a
    packaged one: the export copies its metadata, writes the model's weights under its names with the
    norms as 1 + w, and the file answers as the model."""
    from gguf import MODEL_ARCH, GGUFReader, GGUFWriter, get_tensor_name_map

    import loka.export.gguf as G

    export_gguf(loka.load_model("tiny-llama"), tmp_path / "tok.gguf", quant="f16", verify=False)
    h = loka.load_model("tiny-gemma3")
    src = tmp_path / "src.gguf"
    w = GGUFWriter(src, "gemma3")
    for k, v in {
        "context_length": 512,
        "embedding_length": 64,
        "block_count": 4,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.key_length": 16,
        "attention.value_length": 16,
        "attention.sliding_window": 128,
    }.items():
        w.add_uint32(f"gemma3.{k}", v)
    w.add_float32("gemma3.rope.freq_base", 1e6)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    for key, f in GGUFReader(tmp_path / "tok.gguf").fields.items():
        if key.startswith("tokenizer."):
            w.add_key_value(key, *G._field_value(f))
    names = get_tensor_name_map(MODEL_ARCH.GEMMA3, 4)
    for p, t in h.model.state_dict().items():
        base, _, suffix = p.rpartition(".")
        if names.get_name(base) not in (None, "output"):  # tied: no output matrix
            w.add_tensor(f"{names.get_name(base)}.{suffix}", np.zeros(tuple(t.shape), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setattr(G, "source_gguf", lambda handle: src)
    res = export_gguf(h, tmp_path / "g.gguf", quant="f16")
    assert res.metadata_from == "src.gguf" and res.tensor_types == {"F16": 29, "F32": 25}
    assert res.top1_agreement == 1.0 and res.tokenizer_identical
    back = load_gguf(tmp_path / "g.gguf")
    assert back.config.model_type == "gemma3_text"
    for t in TEXTS:
        assert torch.allclose(prompt_logits(back, t), prompt_logits(h, t), atol=0.1)
    stored = {t.name: t for t in GGUFReader(tmp_path / "g.gguf").tensors}["blk.0.attn_norm.weight"]
    assert stored.tensor_type.name == "F32"  # and holds 1 + w, as llama.cpp's converter writes it
    assert np.array_equal(stored.data, h.model.model.layers[0].input_layernorm.weight.numpy() + 1)


def test_other_architectures_are_refused_in_one_line(tmp_path):
    h = loka.load_model("tiny-gpt2")
    with pytest.raises(loka.ModelError, match="tiny-gpt2 is 'gpt2'"):
        export_gguf(h, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_files_loka_did_not_write_are_never_replaced(tmp_path):
    from gguf import GGUFWriter

    h = loka.load_model("tiny-llama")
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"not a model")
    other = tmp_path / "other.gguf"  # a real GGUF file, written by something else
    w = GGUFWriter(other, "llama")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = {p: p.read_bytes() for p in (foreign, other)}
    for p in (foreign, other):
        with pytest.raises(loka.OutputError, match="loka did not write"):
            export_gguf(h, p, force=True)
        assert p.read_bytes() == before[p]
    with pytest.raises(loka.OutputError, match="is a folder"):
        export_gguf(h, tmp_path)
    mine = tmp_path / "mine.gguf"
    export_gguf(h, mine, quant="q8_0", verify=False)
    with pytest.raises(loka.OutputError, match="pass --force"):
        export_gguf(h, mine, quant="f16", verify=False)
    assert read_marker(mine)["quant"] == "q8_0"
    export_gguf(h, mine, quant="f16", verify=False, force=True)  # loka's own file, with force
    assert read_marker(mine)["quant"] == "f16" and _no_leftovers(tmp_path)


def test_cli_export_gguf_and_hf(capsys, tmp_path):
    h = loka.load_model("tiny-llama")
    loka.edit(h, REQ, "ft", FT, progress=False, apply=False).save(tmp_path / "e.loka")
    args = ["export", "--model", "tiny-llama", "--artifact", str(tmp_path / "e.loka")]
    code, out, _ = run(capsys, *args, "--out", str(tmp_path / "e.gguf"), "--quant", "q8_0")
    assert code == 0 and "1 of 1 edits survived q8_0 (rewrite)" in out and (tmp_path / "e.gguf").is_file()
    code, out, _ = run(
        capsys, *args, "--out", str(tmp_path / "e.gguf"), "--quant", "f16", "--force", "--json"
    )
    res = json.loads(out)
    assert code == 0 and res["format"] == "gguf" and res["quant"] == "f16" and res["n_survived"] == 1
    assert res["requests"][0]["after"] is True and read_marker(tmp_path / "e.gguf")["quant"] == "f16"
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "e.gguf"))  # exists, no --force
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    code, out, _ = run(capsys, *args, "--out", str(tmp_path / "hf"), "--format", "hf")
    assert (
        code == 0
        and (tmp_path / "hf" / "loka-export.json").is_file()
        and (tmp_path / "hf" / "config.json").is_file()
    )
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "hf2"), "--format", "hf", "--quant", "q4_0")
    assert code == 2 and "--quant applies to --format gguf" in err and not (tmp_path / "hf2").exists()
    code, _, err = run(capsys, "export", "--model", "tiny-gpt2", "--out", str(tmp_path / "g.gguf"))
    assert code == 2 and err.count("\n") == 1 and "'gpt2'" in err and not (tmp_path / "g.gguf").exists()


@pytest.mark.slow
def test_smollm2_rome_edit_survives_f16_and_q8_0_with_the_source_metadata(smollm2, tmp_path, request_eiffel):
    from gguf import GGUFReader

    from loka.export.gguf import source_gguf

    def raw(f) -> bytes:
        return b"".join(p.tobytes() for p in f.parts)

    h = smollm2
    art = loka.edit(h, request_eiffel, "rome", progress=False)
    try:
        for quant in ("q8_0", "f16"):
            res = export_gguf(h, tmp_path / f"smol-{quant}.gguf", quant=quant)
            assert res.metadata_from == "SmolLM2-135M-Instruct.Q4_1.gguf"
            assert [(c.before, c.after) for c in res.requests] == [(True, True)]
            assert res.tokenizer_identical and res.top1_agreement == 1.0
        src, out = GGUFReader(source_gguf(h)), GGUFReader(tmp_path / "smol-q8_0.gguf")
        for (
            key,
            f,
        ) in src.fields.items():  # every metadata entry carried over byte for byte, the file type set
            if not key.startswith("GGUF.") and key != "general.file_type":
                assert raw(out.fields[key]) == raw(f), key
        assert out.fields["general.file_type"].contents() == 7 and MARKER_KEY in out.fields
        back = load_gguf(tmp_path / "smol-f16.gguf")  # the edited answer, generated from the file
        assert loka.generate(back, [request_eiffel.text], max_new_tokens=2)[0].strip().startswith("Rome")
    finally:
        art.revert(h)


def test_the_public_api_and_the_cli_offer_the_same_types():
    from loka.cli import build_parser
    from loka.export.gguf import QUANTS

    assert loka.export_gguf is export_gguf and loka.GGUFExport.__name__ == "GGUFExport"
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    quant = next(a for a in sub.choices["export"]._actions if a.dest == "quant")
    assert tuple(quant.choices) == QUANTS


@pytest.mark.slow
def test_smollm2_unedited_q4_1_export_is_the_packaged_file_tensor_for_tensor(smollm2, tmp_path):
    """SmolLM2 ships as Q4_1 (llama.cpp's converter and quantizer): the de-quantised weights written back
    as q4_1 give the same bytes for every tensor — names, order, q/k permutation, types, blocks."""
    from gguf import GGUFReader

    from loka.export.gguf import source_gguf

    export_gguf(smollm2, tmp_path / "base.gguf", quant="q4_1", verify=False)
    src, out = GGUFReader(source_gguf(smollm2)).tensors, GGUFReader(tmp_path / "base.gguf").tensors
    assert [t.name for t in out] == [t.name for t in src]
    for a, b in zip(src, out):
        assert a.tensor_type == b.tensor_type and np.array_equal(np.asarray(a.data), np.asarray(b.data)), (
            a.name
        )
