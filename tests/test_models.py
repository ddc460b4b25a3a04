import os

import pytest
import torch

import loka
from loka.models.arch import GPT2, GPTJ, LLAMA, NEOX

from .conftest import TINY


def test_offline_mode_is_set():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("name, spec", list(zip(TINY, [LLAMA, GPT2, GPTJ, NEOX])))
def test_tiny_models_get_their_family_spec(name, spec):
    h = loka.load_model(name)
    assert h.spec is spec
    assert h.n_layers == 4
    w = h.weight(1)
    assert w.shape == (64, 128)  # always (out, in), whatever the storage
    stored = h.param(h.weight_name(1))
    assert stored.shape == ((128, 64) if spec.transposed else (64, 128))
    # every path of the spec resolves
    for path in (spec.final_norm, spec.unembed, spec.embed, spec.block_path(0), spec.mlp_out_path(3)):
        h.module(path)


def test_tiny_models_are_seeded():
    a, b = loka.load_model("tiny-llama"), loka.load_model("tiny-llama")
    assert a.model_hash == b.model_hash
    assert loka.load_model("tiny-llama", seed=1).model_hash != a.model_hash


def test_unknown_model_lists_known_names_and_hint():
    with pytest.raises(loka.ModelError) as e:
        loka.load_model("gpt-17")
    msg = str(e.value)
    assert "smollm2-135m" in msg and "tiny-gpt2" in msg and "folder" in msg


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(loka.ModelError, match="config.json"):
        loka.load_model(str(tmp_path))


def test_layer_out_of_range():
    h = loka.load_model("tiny-llama")
    with pytest.raises(loka.ModelError, match=r"layers 0\.\.3"):
        h.weight(4)
    with pytest.raises(loka.ModelError, match="out of range"):
        loka.default_hparams("rome", h, {"layer": 9})


def test_save_and_reload_folder_keeps_weights(tmp_path):
    h = loka.load_model("tiny-gpt2")
    h.save_pretrained(tmp_path / "m")
    h2 = loka.load_model(str(tmp_path / "m"))
    for k, v in h.model.state_dict().items():
        assert torch.equal(v, h2.model.state_dict()[k])


def test_list_models_reports_registered_and_tiny():
    rows = {r["name"]: r for r in loka.list_models()}
    assert {"smollm2-135m", "gemma3-270m", *TINY} <= set(rows)
    assert rows["tiny-llama"]["installed"]


def test_gemma_family_declares_its_post_mlp_norm():
    from transformers import Gemma3TextConfig

    from loka.models.arch import GEMMA3, spec_for

    assert spec_for(Gemma3TextConfig()) is GEMMA3 and GEMMA3.post_mlp_norm == "post_feedforward_layernorm"
    assert loka.load_model("tiny-gemma3").spec is GEMMA3


def test_cache_check_skips_rehash_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    from loka.models import loader
    from loka.utils.io import sha256_file

    w = tmp_path / "model.safetensors"
    w.write_bytes(b"weights" * 1000)
    good = sha256_file(w)
    assert not loader._verified(w, "0" * 64)  # wrong hash: refused, no stamp written
    assert not (tmp_path / "model.safetensors.verified").exists()
    assert loader._verified(w, good)
    assert (tmp_path / "model.safetensors.verified").exists()
    calls = []
    monkeypatch.setattr(loader, "sha256_file", lambda p: calls.append(p) or sha256_file(p))
    assert loader._verified(w, good) and calls == []  # unchanged file: the stamp is trusted
    w.write_bytes(b"tampered" * 1000)  # same path, new size and mtime: hashed again and refused
    assert not loader._verified(w, good) and len(calls) == 1
    assert not (tmp_path / "model.safetensors.verified").exists()
    w.write_bytes(b"weights" * 1000)
    monkeypatch.setenv("LOKA_VERIFY_CACHE", "always")
    assert loader._verified(w, good) and loader._verified(w, good) and len(calls) == 3


def test_cached_conversion_tokenizer_matches_autotokenizer():
    """The fast path that builds a cached conversion's tokenizer from tokenizer.json gives the
    same ids, special tokens and padding side as AutoTokenizer."""
    from transformers import AutoTokenizer

    from loka.models import loader

    folder = loader.cached_folder("smollm2-135m")
    if not (folder / "loka.json").exists():
        pytest.skip("smollm2-135m is not converted in this cache")
    fast, auto = loader._fast_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for s in ["The Eiffel Tower is in", " Paris", "héllo  wörld\n\nx<|im_end|>"]:
        assert fast(s)["input_ids"] == auto(s)["input_ids"]
    for attr in ["padding_side", "pad_token_id", "bos_token_id", "eos_token_id"]:
        assert getattr(fast, attr) == getattr(auto, attr)
