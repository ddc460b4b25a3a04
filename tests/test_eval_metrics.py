"""Each metric against hand-computed values."""

import math

import pytest

from loka.eval.metrics import METRICS, harmonic_mean, ngram_entropy


def sc(lps, argmax=None, target=None):
    n = len(lps)
    return {"token_logprobs": lps, "argmax_ids": argmax or [0] * n, "target_ids": target or [0] * n}


POST = {
    # two edit prompts: first prefers new (mean lp -0.5 vs -2), second prefers true (-3 vs -1)
    "rewrite": {
        "new": [sc([-0.5], [7], [7]), sc([-3.0, -3.0], [1, 9], [1, 2])],
        "true": [sc([-2.0]), sc([-1.0])],
    },
    "paraphrase": {"new": [sc([-1.0], [4], [4])], "true": [sc([-1.5])]},
    "neighborhood": {"new": [sc([-4.0]), sc([-0.1])], "true": [sc([-1.0], [5], [5]), sc([-2.0], [6], [6])]},
}
PRE = {
    "neighborhood": {"new": [sc([-4.0]), sc([-4.0])], "true": [sc([-1.0], [5], [5]), sc([-1.0], [3], [6])]}
}


def test_counterfact_success_metrics():
    assert METRICS["ES"](POST, None) == 0.5
    assert METRICS["PS"](POST, None) == 1.0
    assert METRICS["NS"](POST, None) == 0.5  # second neighbour now prefers the new object


def test_counterfact_magnitudes():
    em = ((math.exp(-0.5) - math.exp(-2.0)) + (math.exp(-3.0) - math.exp(-1.0))) / 2
    assert METRICS["EM"](POST, None) == pytest.approx(em)
    assert METRICS["PM"](POST, None) == pytest.approx(math.exp(-1.0) - math.exp(-1.5))
    nm = ((math.exp(-1.0) - math.exp(-4.0)) + (math.exp(-2.0) - math.exp(-0.1))) / 2
    assert METRICS["NM"](POST, None) == pytest.approx(nm)


def test_token_accuracy_metrics():
    assert METRICS["reliability"](POST, None) == pytest.approx((1.0 + 0.5) / 2)
    assert METRICS["generalization"](POST, None) == 1.0
    # locality: argmax of the true-target tokens, before vs after: 5==5, 6!=3
    assert METRICS["locality"](POST, PRE) == 0.5
    assert METRICS["locality"](POST, None) is None
    assert METRICS["portability"](POST, None) is None  # no portability probes


def test_ngram_entropy_by_hand():
    # bigrams ab, ba, ab -> (2/3, 1/3): 0.918296 bits; trigrams aba, bab -> 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("word") == 0.0


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean([1.0, 0.0]) == 0.0
    assert harmonic_mean([]) is None


def test_generation_metrics_read_the_generation_block():
    post = {"_gen": {"gen_success": 0.5, "GE": 4.2, "multihop": 1.0}}
    assert METRICS["gen_success"](post, None) == 0.5 and METRICS["GE"](post, None) == 4.2
    assert METRICS["multihop"](post, None) == 1.0
