"""WILD scoring: answers by greedy generation to a stop rule, matched after SQuAD normalisation."""

import json

import pytest

import loka
from loka.eval.data import load_cases
from loka.eval.metrics import case_metrics, squad_normalise, wild_answer, wild_generations
from loka.eval.runner import EvalConfig, run_eval

from .conftest import DATA


def test_normalisation_and_stop_rule():
    assert squad_normalise("The  Eiffel-Tower, in PARIS!") == "eiffel tower in paris"
    assert squad_normalise("an apple a day") == "apple day"
    assert wild_answer(" Rome. It is the capital") == "Rome"
    assert wild_answer(" Rome\nQ: next") == "Rome"
    assert wild_answer("\nRome") == ""  # a newline first: the answer is empty, as the stop rule says
    assert wild_answer(" in the city of Rome") == "in the city of Rome"


def test_metrics_from_generations():
    post = {
        "_wild": {
            "target": "Rome",
            "question": ["Rome"],
            "paraphrase": ["the city of Rome", "Paris"],
            "neighborhood": ["Paris", "London"],
        }
    }
    pre = {
        "_wild": {
            "target": "Rome",
            "question": ["Paris"],
            "paraphrase": ["Paris", "Paris"],
            "neighborhood": ["Paris", "Berlin"],
        }
    }
    m = case_metrics(post, pre)
    assert m["wild_em"] == 1.0 and m["wild_success"] == 1.0 and m["wild_para"] == 0.5
    assert m["wild_locality"] == 0.5  # the second neighbour's answer changed
    post["_wild"]["question"] = ["It is Rome, of course"]
    m = case_metrics(post, pre)
    assert m["wild_em"] == 0.0 and m["wild_success"] == 1.0  # contained, not exact
    assert "wild_em" not in case_metrics({}, {})  # not measured: not reported


def test_generations_use_the_question_and_every_probe():
    h = loka.load_model("tiny-llama")
    cases = load_cases(DATA / "generated" / "lifelong_10000.json", 2) + load_cases(
        DATA / "counterfact_sample5.json", 1
    )
    got = wild_generations(h, cases, max_new_tokens=4)
    for c, g in zip(cases, got):
        assert len(g["question"]) == 1 and len(g["paraphrase"]) == len(c.paraphrase)
        assert len(g["neighborhood"]) == len(c.neighborhood)
    # the same prompts alone give the same answers (batching does not change greedy answers)
    alone = wild_generations(h, cases[:1], max_new_tokens=4)[0]
    assert alone == got[0]


def test_an_eval_run_reports_wild_and_an_unedited_model_keeps_its_neighbours(tmp_path):
    h = loka.load_model("tiny-llama")
    cases = load_cases(DATA / "generated" / "lifelong_10000.json", 3)
    s = run_eval(h, cases, EvalConfig(method="none", wild=True, guard=False), tmp_path / "r")
    assert s["post"]["wild_locality"] == 1.0 and {"wild_em", "wild_success", "wild_para"} <= set(s["post"])
    assert s["config"]["wild"] is True
    # every case's generated answers are kept beside the scores that matched them
    rows = [json.loads(x) for x in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    for r, c in zip(rows, cases):
        wild = r["after"]["wild"]
        assert wild == r["before"]["wild"]  # nothing edited
        assert len(wild["question"]) == 1 and len(wild["neighborhood"]) == len(c.neighborhood)
        assert all(isinstance(a, str) for a in wild["paraphrase"])
    # resuming without --wild is another run, and the message says which setting differs
    with pytest.raises(loka.ConfigError, match="wild: True in the folder, not set now"):
        run_eval(h, cases, EvalConfig(method="none", guard=False), tmp_path / "r", resume=True)
