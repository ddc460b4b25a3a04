import json

import pytest

import loka
from loka import EditRequest, RequestError, read_requests

from .conftest import DATA


def test_valid_request_fills_subject():
    r = EditRequest("{} is located in", "Eiffel Tower", "Rome")
    assert r.text == "Eiffel Tower is located in"
    assert r.paraphrases == [] and r.neighborhood == []


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt": "Eiffel Tower is located in", "subject": "Eiffel Tower", "target_new": "Rome"}, "prompt"),
        ({"prompt": "{} and {}", "subject": "X", "target_new": "Rome"}, "prompt"),
        ({"prompt": "{} is in", "subject": "", "target_new": "Rome"}, "subject"),
        ({"prompt": "{} is in", "subject": "X", "target_new": "  "}, "target_new"),
        (
            {"prompt": "{} is in", "subject": "X", "target_new": "Rome", "paraphrases": "not a list"},
            "paraphrases",
        ),
    ],
)
def test_invalid_requests_name_the_field(kwargs, field):
    with pytest.raises(RequestError, match=field):
        EditRequest(**kwargs)


def test_reader_accepts_counterfact_records():
    reqs = read_requests(DATA / "counterfact_sample5.json")
    raw = json.loads((DATA / "counterfact_sample5.json").read_text())
    assert len(reqs) == 5
    rw = raw[0]["requested_rewrite"]
    assert reqs[0].subject == rw["subject"] and reqs[0].target_new == rw["target_new"]["str"]
    assert reqs[0].target_true == rw["target_true"]["str"]
    assert reqs[0].paraphrases == raw[0]["paraphrase_prompts"]
    assert reqs[0].neighborhood == raw[0]["neighborhood_prompts"]


def test_reader_jsonl_and_aliases(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(
        '{"prompt": "{} plays", "subject": "Messi", "target": "tennis"}\n\n'
        '{"prompt": "{} speaks", "subject": "Darrieux", "target_new": "English", "neighbourhood": ["X speaks"]}\n'
    )
    reqs = read_requests(p)
    assert [r.target_new for r in reqs] == ["tennis", "English"]
    assert reqs[1].neighborhood == ["X speaks"]


def test_reader_rejects_unknown_fields_and_bad_lines(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "{} plays", "subject": "Messi", "target_new": "tennis", "colour": "red"}\n')
    with pytest.raises(RequestError, match="unknown field.*colour"):
        read_requests(p)
    p.write_text('{"prompt": "{} plays", "subject": "Messi", "target_new": "tennis"}\n{oops\n')
    with pytest.raises(RequestError, match=r"bad.jsonl:2: malformed JSON"):
        read_requests(p)
    p.write_text('{"prompt": "{} plays", "target_new": "tennis"}\n')
    with pytest.raises(RequestError, match="missing field.*subject"):
        read_requests(p)
    with pytest.raises(RequestError, match="does not exist"):
        read_requests(tmp_path / "nope.jsonl")


def test_subject_last_token_index():
    h = loka.load_model("tiny-llama")  # byte tokenizer: one token per byte
    assert loka.requests.subject_last_token(h.tokenizer, "The {} is", "cat") == len("The cat") - 1


def test_subject_may_swallow_punctuation_but_not_letters(monkeypatch):
    class Tok:  # a tokenizer that merges ")'" like BPE vocabularies do
        def __call__(self, text):
            toks = []
            i = 0
            while i < len(text):
                step = 2 if text[i : i + 2] in (")'", "To") else 1
                toks.append(text[i : i + step])
                i += step
            return {"input_ids": toks}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(ids)

    from loka.requests import subject_last_token

    assert subject_last_token(Tok(), "{}'s office", "Fed (Ont)") == len("Fed (Ont")  # the ")'" token
    with pytest.raises(RequestError, match="not found as a token span"):
        subject_last_token(Tok(), "The {}o", "T")  # "T" ends inside the token "To"


def test_hyperparameters_of_the_wrong_type_are_refused_by_name():
    """A scalar hyperparameter of the wrong type fails at once with the field named (e.g. ``--set
    key_tree=maybe`` used to be taken as true); ints stand for floats, bools never for numbers."""
    from loka.errors import LokaError
    from loka.methods.memit import MemitHParams

    assert MemitHParams.from_dict({"v_lr": 2, "key_tree": False}).v_lr == 2
    for field, bad in [("key_tree", "maybe"), ("v_steps", 2.5), ("v_lr", True), ("v_grouping", 3)]:
        with pytest.raises(LokaError, match=f"MemitHParams.{field}"):
            MemitHParams.from_dict({field: bad})
