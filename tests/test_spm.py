"""The SentencePiece backend for SentencePiece-BPE tokenizer.json files (Gemma 3's fast load)."""

from __future__ import annotations

import json

import pytest

from loka.models import loader, spm

TEXTS = [
    "The Eiffel Tower is in Paris.",
    "  Lionel Messi   plays football.",
    "Indent    code\tand tabs",
    "x\n\ny <bos> z<eos>",
    "héllo wörld 日本語 🙂",
    " Paris",
    "",
    "a" * 30,
    "The  The   The    The",
]


def _spm_folder(tmp_path):
    """A trained SentencePiece-shaped BPE tokenizer (normaliser ' '->'▁', byte fallback, <bos> template)
    whose added tokens are pieces of the vocabulary, like Gemma 3's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tmp_path.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    corpus = [
        "The Eiffel Tower is in Paris.  Lionel Messi plays football.",
        "Indent    code\tand tabs  here",
        "Paris is the capital of France.   The Tower is tall.",
        "Messi plays for Inter Miami now.",
    ] * 20
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=260, special_tokens=["<pad>", "<eos>", "<bos>", "<mask>", "<unk>"]),
    )
    d = json.loads(tk.to_str())
    vocab = d["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    for content in ("\n", "\n\n", "<start_of_turn>"):
        vocab[content] = len(vocab)
        d["added_tokens"].append(
            {
                "id": vocab[content],
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": content.startswith("<"),
            }
        )
    bos = vocab["<bos>"]
    d["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<bos>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<bos>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [bos], "tokens": ["<bos>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(d, ensure_ascii=False))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "tokenizer_class": "GemmaTokenizer",
            }
        )
    )
    return tmp_path


def _reference(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_spm_conversion_encodes_and_decodes_like_tokenizers(tmp_path):
    folder = _spm_folder(tmp_path)
    ref = _reference(folder)
    tok = loader._fast_tokenizer(folder)
    assert type(tok).__name__ == "SentencePieceTokenizer"
    assert json.loads((folder / spm.SPM_META).read_text())["ok"] is True
    assert spm.mismatch(tok, ref) is None
    for s in TEXTS:
        assert tok(s)["input_ids"] == ref(s)["input_ids"], s
        assert tok.decode(ref(s)["input_ids"]) == ref.decode(ref(s)["input_ids"])
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    want = ref(TEXTS, padding=True, return_tensors="pt")
    assert set(batch) == set(want) and all((batch[k] == want[k]).all() for k in want)
    assert tok.padding_side == ref.padding_side == "left"  # Gemma's family default survives
    byte = ref.convert_tokens_to_ids
    assert tok.decode([byte("<0xC3>"), byte("<0xA9>")]) == "é"
    broken = [
        byte("<0x68>"),
        byte("<0xF0>"),
        byte("<0x51>"),
        *ref("Paris", add_special_tokens=False)["input_ids"],
    ]
    assert tok.decode(broken) == ref.decode(broken) == "\ufffd" * 3 + "Paris"  # an invalid UTF-8 run
    import copy
    import pickle

    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert clone(TEXTS)["input_ids"] == ref(TEXTS)["input_ids"]
    # whitespace runs merge in the order of tokenizers' merge ranks, not greedily
    assert any("\u2581\u2581" in t for t in tok.convert_ids_to_tokens(tok("a    b")["input_ids"]))


def test_an_inexact_conversion_is_caught_and_tokenizers_kept(tmp_path, monkeypatch):
    """Merges fired in another order give other ids: the probe check must see it and keep tokenizers."""
    folder = _spm_folder(tmp_path)
    good = json.loads((folder / "tokenizer.json").read_text())
    bad = {**good, "model": {**good["model"], "merges": good["model"]["merges"][::-1]}}
    (folder / spm.SPM_FILE).write_bytes(spm.sentencepiece_proto(bad))
    wrong = spm._construct(
        folder,
        {"added_tokens": good["added_tokens"], "add_bos": "<bos>"},
        {
            "padding_side": "left",
            "model_input_names": ["input_ids", "attention_mask"],
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        },
    )
    assert spm.mismatch(wrong, _reference(folder)) is not None
    (folder / spm.SPM_FILE).unlink()
    calls = []
    real = spm.sentencepiece_proto
    monkeypatch.setattr(spm, "sentencepiece_proto", lambda tj: calls.append(1) or real(bad))
    tok = loader._fast_tokenizer(folder)
    assert calls and type(tok).__name__ != "SentencePieceTokenizer"
    meta = json.loads((folder / spm.SPM_META).read_text())
    assert meta["ok"] is False and "differs from tokenizers" in meta["reason"]
    assert not (folder / spm.SPM_FILE).exists()
    again = loader._fast_tokenizer(folder)  # recorded: not converted again for the same source
    assert type(again).__name__ != "SentencePieceTokenizer" and len(calls) == 1


def test_unsupported_shapes_are_named_and_stay_on_tokenizers(tmp_path):
    from tests.test_models import _bpe_folder

    folder = _bpe_folder(tmp_path)  # byte-level BPE (GPT-2 / SmolLM2 style)
    tok = loader._fast_tokenizer(folder)
    assert type(tok).__name__ != "SentencePieceTokenizer"
    meta = json.loads((folder / spm.SPM_META).read_text())
    assert meta["ok"] is False and "byte_fallback" in meta["reason"]
    tj = json.loads((_spm_folder(tmp_path / "spm") / "tokenizer.json").read_text())
    with pytest.raises(spm.Unsupported, match="normalizer"):
        spm.sentencepiece_proto({**tj, "normalizer": None})
    with pytest.raises(spm.Unsupported, match="added token"):
        spm.sentencepiece_proto(
            {**tj, "added_tokens": [*tj["added_tokens"], {"id": 10**6, "content": "<x>"}]}
        )


def test_env_forces_tokenizers_and_a_damaged_conversion_is_rebuilt(tmp_path, monkeypatch):
    folder = _spm_folder(tmp_path)
    monkeypatch.setenv("LOKA_TOKENIZER", "tokenizers")
    assert type(loader._fast_tokenizer(folder)).__name__ != "SentencePieceTokenizer"
    monkeypatch.delenv("LOKA_TOKENIZER")
    assert type(loader._fast_tokenizer(folder)).__name__ == "SentencePieceTokenizer"
    (folder / spm.SPM_FILE).write_bytes(b"\x00garbage")
    fallback = loader._fast_tokenizer(folder)
    assert type(fallback).__name__ != "SentencePieceTokenizer"
    assert fallback("The Eiffel Tower")["input_ids"] == _reference(folder)("The Eiffel Tower")["input_ids"]
    assert type(loader._fast_tokenizer(folder)).__name__ == "SentencePieceTokenizer"  # converted again


def test_save_pretrained_writes_the_original_tokenizer_files(tmp_path):
    folder = _spm_folder(tmp_path / "src")
    tok = loader._fast_tokenizer(folder)
    tok.save_pretrained(tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes()
    assert not (tmp_path / "out" / spm.SPM_FILE).exists()
    again = _reference(tmp_path / "out")
    assert again(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]


@pytest.mark.parametrize("name", ["gemma3-270m"])
def test_cached_gemma_tokenizer_is_sentencepiece_and_matches_autotokenizer(name):
    folder = loader.cached_folder(name) if loader.KNOWN_MODELS[name].installed() else None
    if folder is None or not (folder / "loka.json").exists():
        pytest.skip(f"{name} is not converted in this cache")
    tok, ref = loader._fast_tokenizer(folder), _reference(folder)
    assert type(tok).__name__ == "SentencePieceTokenizer"
    assert spm.mismatch(tok, ref) is None


def test_a_conversion_that_raises_is_recorded_and_tokenizers_kept(tmp_path, monkeypatch):
    folder = _spm_folder(tmp_path)

    def refuse(*a, **k):
        raise RuntimeError("SentencePiece refused the model")

    monkeypatch.setattr(spm, "_construct", refuse)
    tok = loader._fast_tokenizer(folder)
    assert type(tok).__name__ != "SentencePieceTokenizer"
    meta = json.loads((folder / spm.SPM_META).read_text())
    assert meta["ok"] is False and "conversion failed: RuntimeError" in meta["reason"]
    assert not (folder / spm.SPM_FILE).exists()
