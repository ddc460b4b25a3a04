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


def _bpe_folder(tmp_path, with_space_merge: bool = False):
    """A small trained BPE tokenizer folder with special and normal added tokens."""
    import json

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["The Eiffel Tower is in Paris. Lionel Messi plays football.\n\nnew lines\tand tabs"] * 50
    tk.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"])
    )
    tk.add_special_tokens([AddedToken(f"<unused{i}>", special=True, normalized=False) for i in range(40)])
    tk.add_tokens([AddedToken("<b>", normalized=False), AddedToken("Eiffel Tower", single_word=True)])
    d = json.loads(tk.to_str())
    if with_space_merge:  # a merge whose part holds a space: the pairs must stay pairs
        d["model"]["merges"].append(["a b", "c"])
        d["model"]["vocab"].update({"a b": 1000, "c": 1001, "a bc": 1002})
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))
    return tmp_path


@pytest.mark.parametrize("space", [False, True], ids=["string-merges", "pair-merges"])
def test_compact_tokenizer_serialises_and_encodes_like_the_source(tmp_path, space):
    """The compact tokenizer.json (merges as strings, added tokens re-added in one batch) gives a
    backend identical to the source's and the same ids; a changed source is re-compacted."""
    import json
    import time

    from transformers import PreTrainedTokenizerFast

    from loka.models import loader

    folder = _bpe_folder(tmp_path, space)
    ref = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), eos_token="<eos>", pad_token="<pad>"
    )
    fast = loader._fast_tokenizer(folder)
    assert (folder / "tokenizer.compact.json").exists()
    merges = json.loads((folder / "tokenizer.compact.json").read_text())["model"]["merges"]
    assert isinstance(merges[0], list if space else str)
    assert json.loads(fast.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    s = "The Eiffel Tower <unused3> is<b>in Paris <eos><pad>\n\n\ttabs Eiffel Towers"
    assert fast(s)["input_ids"] == ref(s)["input_ids"]
    assert fast.added_tokens_decoder == ref.added_tokens_decoder
    again = loader._fast_tokenizer(folder)  # from the stamp, no rebuild
    assert again(s)["input_ids"] == ref(s)["input_ids"]
    time.sleep(0.01)
    d = json.loads((folder / "tokenizer.json").read_text())
    d["added_tokens"] = [a for a in d["added_tokens"] if a["content"] != "<b>"]
    (folder / "tokenizer.json").write_text(json.dumps(d))
    changed = loader._fast_tokenizer(folder)
    assert "<b>" not in changed.get_vocab()


def test_a_damaged_compact_tokenizer_falls_back_to_the_source_and_is_rebuilt(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from loka.models import loader

    folder = _bpe_folder(tmp_path)
    ref = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), eos_token="<eos>", pad_token="<pad>"
    )
    loader._fast_tokenizer(folder)
    (folder / "tokenizer.compact.json").write_text("{not json")
    s = "The Eiffel Tower <unused3> is<b>in Paris"
    assert loader._fast_tokenizer(folder)(s)["input_ids"] == ref(s)["input_ids"]
    assert not (folder / "tokenizer.compact.json").exists()  # removed, rebuilt on the next load
    assert loader._fast_tokenizer(folder)(s)["input_ids"] == ref(s)["input_ids"]
    assert (folder / "tokenizer.compact.json").exists()
