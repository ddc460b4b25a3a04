from __future__ import annotations

import json
from pathlib import Path

import pytest

import loka
from loka.resources import data_dir

DATA = Path(__file__).resolve().parents[1] / "data"  # the repository's benchmark/doc data
PKG_DATA = data_dir()  # what loka itself reads (package data)
TINY = ["tiny-llama", "tiny-gpt2", "tiny-gptj", "tiny-neox", "tiny-gemma3"]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A JSONL corpus of real English sentences from the bundled TOFU data (fast, no sampling)."""
    texts = []
    for name in ["retain_perturbed_subset_reconstructed.json", "forget10_reconstructed.json"]:
        for rec in json.loads((PKG_DATA / "tofu" / name).read_text()):
            texts.append(f"{rec['question']} {rec['answer']}")
    p = tmp_path_factory.mktemp("corpus") / "tofu.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return p


@pytest.fixture(scope="session")
def smollm2():
    try:
        return loka.load_model("smollm2-135m")
    except loka.ModelError as e:  # the package is installed by `make test`; say so if it is not
        pytest.fail(f"SmolLM2 unavailable: {e}")


@pytest.fixture
def request_eiffel():
    return loka.EditRequest(
        "{} is located in the city of",
        "Eiffel Tower",
        "Rome",
        target_true="Paris",
        paraphrases=["Where is the Eiffel Tower? It is in the city of"],
        neighborhood=["The Louvre is located in the city of"],
    )


def answer_em(handle, text: str, answer: str) -> float:
    """Teacher-forced exact match of ``answer`` after ``text`` (the tiny models tokenise bytes)."""
    import torch

    from loka.forgetting import losses as L

    b = L.qa_batch(handle.tokenizer, [text], [answer])
    with torch.no_grad():
        lg, rows = L.answer_logits(handle, b)
    return float(L.exact_match(lg, rows, b).mean())


def prompt_logits(handle, text: str):
    """The model's logits for ``text`` (no gradient)."""
    import torch

    ids = handle.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return handle.model(**ids).logits


def pytest_report_header(config):
    import importlib.metadata as md

    names = ("torch", "transformers", "peft", "accelerate", "tokenizers")
    return "loka under: " + ", ".join(f"{n} {md.version(n)}" for n in names)
