import pytest
import torch

import loka
from loka.corpus import JsonlCorpus, TextFilesCorpus, corpus_from_spec
from loka.stats import _paths, second_moments


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOKA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny():
    return loka.load_model("tiny-gptj")


def _manual(h, layer, texts, n_tokens):
    ks = []
    for t in texts:
        enc = h.tokenizer(t, return_tensors="pt", truncation=True, max_length=256)
        with loka.capture(h.model, [h.spec.mlp_out_path(layer)], outputs=False) as rec:
            h.model(**enc)
        ks.append(rec[h.spec.mlp_out_path(layer)].input[0])
    k = torch.cat(ks)[:n_tokens].double()
    return (k.T @ k / len(k)).float()


def test_several_layers_in_one_pass_match_a_direct_computation(home, tiny, text_corpus):
    corpus = JsonlCorpus(text_corpus)
    covs = second_moments(tiny, [1, 3], corpus, 3000, batch_size=4, progress=False)
    texts = list(corpus.texts())
    for layer in (1, 3):
        assert torch.allclose(covs[layer], _manual(tiny, layer, texts[:60], 3000), rtol=1e-4, atol=1e-6)


def test_cache_is_used_and_validated(home, tiny, text_corpus, monkeypatch):
    corpus = JsonlCorpus(text_corpus)
    first = second_moments(tiny, [2], corpus, 1000, progress=False)[2]
    import loka.stats as st

    with monkeypatch.context() as m:
        m.setattr(st, "_compute", lambda *a, **k: pytest.fail("recomputed despite a valid cache"))
        assert torch.equal(second_moments(tiny, [2], corpus, 1000, progress=False)[2], first)
    # corrupt the cached file: it must be detected by its sha256 and recomputed
    f, _, _ = _paths(tiny, 2, corpus.fingerprint(), 1000)
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    again = second_moments(tiny, [2], corpus, 1000, progress=False)[2]
    assert torch.equal(again, first)


def test_interrupted_pass_resumes_from_its_checkpoint(home, tiny, text_corpus, monkeypatch):
    corpus = JsonlCorpus(text_corpus)
    ref = second_moments(tiny, [1], JsonlCorpus(text_corpus), 8000, batch_size=2, progress=False)[1]
    # remove the finished cache, then interrupt a new run after a few checkpoints
    f, meta, partial = _paths(tiny, 1, corpus.fingerprint(), 8000)
    f.unlink()
    meta.unlink()
    seen = {"n": 0}
    real_texts = JsonlCorpus.texts

    def interrupted(self):
        for i, t in enumerate(real_texts(self)):
            if i == 12:
                raise KeyboardInterrupt
            seen["n"] += 1
            yield t

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(JsonlCorpus, "texts", interrupted)
        second_moments(tiny, [1], corpus, 8000, batch_size=2, checkpoint_every=2, progress=False)
    assert partial.exists()
    resumed = second_moments(tiny, [1], corpus, 8000, batch_size=2, checkpoint_every=2, progress=False)[1]
    assert torch.allclose(resumed, ref, rtol=1e-5)
    assert not partial.exists()


def test_corpus_sources(tmp_path, tiny):
    txt = tmp_path / "a.txt"
    txt.write_text("First paragraph.\n\nSecond one.\n")
    assert list(TextFilesCorpus([txt]).texts()) == ["First paragraph.", "Second one."]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(loka.LokaError, match="no string field 'text'"):
        list(JsonlCorpus(bad).texts())
    assert corpus_from_spec("self", tiny).__class__.__name__ == "SelfSampledCorpus"
    with pytest.raises(loka.LokaError, match="not found"):
        corpus_from_spec(str(tmp_path / "missing.jsonl"), tiny)


def test_self_sampled_corpus_is_seeded_and_cached(home, tiny):
    from loka.corpus import SelfSampledCorpus

    a = list(SelfSampledCorpus(tiny, n_tokens=300, seed=1, max_new_tokens=16, batch_size=8).texts())
    b = list(SelfSampledCorpus(tiny, n_tokens=300, seed=1, max_new_tokens=16, batch_size=8).texts())
    assert a == b and sum(len(t) for t in a) >= 300
    assert SelfSampledCorpus(tiny, n_tokens=300, seed=1, max_new_tokens=16).path().exists()


def test_bundled_tofu_corpus(home):
    from loka.corpus import corpus_from_spec

    c = corpus_from_spec("tofu", None)
    texts = list(c.texts())
    assert len(texts) == 600 and all(t.strip() for t in texts)
    assert corpus_from_spec("tofu", None).fingerprint() == c.fingerprint()  # content-addressed, stable
