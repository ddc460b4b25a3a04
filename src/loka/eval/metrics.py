"""Editing metrics, one registry. Each metric is a small function of a case's scores.

A case is scored with one batched forward (:func:`score_case`): every probe prompt with the new and
the true target, teacher-forced. Probability metrics follow CounterFact (ROME §3.3; mean per-token
log-probability compares targets of different lengths); token-accuracy metrics follow EasyEdit.
Generation metrics need greedy decoding and are computed only when asked (:func:`generation_scores`).
RS (reference score) is not implemented: it needs Wikipedia reference texts we do not have.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..requests import QA_PROMPT
from ..scoring import generate, score_targets
from .data import EvalCase

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

MetricFn = Callable[[dict, dict | None], float | None]
METRICS: dict[str, MetricFn] = {}
#: Metrics whose summary is a mean over cases, in the order tables print them.
TABLE = [
    "ES",
    "PS",
    "NS",
    "EM",
    "PM",
    "NM",
    "reliability",
    "generalization",
    "locality",
    "portability",
    "gen_success",
    "qa_success",
    "wild_em",
    "wild_success",
    "wild_para",
    "wild_locality",
    "GE",
    "multihop",
]


def metric(name: str):
    def deco(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return deco


# -- scoring ------------------------------------------------------------------------------------
def _case_rows(case: EvalCase) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    keys: list[tuple[str, str]] = []  # (group, which) per row
    prompts, targets = [], []
    for group in ("rewrite", "paraphrase", "neighborhood"):
        plist = getattr(case, group)
        for which, target in (("new", case.target_new), ("true", case.target_true)):
            # neighbourhood prompts with their own answers (loka's lifelong stream) compare each answer
            # with the new target, also when the edit has no true answer (an inserted fact)
            own = group == "neighborhood" and which == "true" and case.neighborhood_answers
            if target or own:
                keys += [(group, which)] * len(plist)
                prompts += plist
                targets += list(case.neighborhood_answers) if own else [target] * len(plist)
    for group in ("locality", "portability"):
        for p, a in getattr(case, group):
            keys.append((group, "answer"))
            prompts.append(p)
            targets.append(a)
    return keys, prompts, targets


def score_cases(handle: ModelHandle, cases: list[EvalCase], mode: str = "packed") -> list[dict]:
    """Teacher-forced scores of every probe of each case with the new and the true target; the rows
    of all ``cases`` go through the same batched calls (several records per packed forward)."""
    rows = [_case_rows(c) for c in cases]
    prompts = [p for _, ps, _ in rows for p in ps]
    targets = [t for _, _, ts in rows for t in ts]
    scored = score_targets(handle, prompts, targets, mode=mode) if prompts else []
    out, i = [], 0
    for keys, _, _ in rows:
        d: dict = {}
        for group, which in keys:
            d.setdefault(group, {}).setdefault(which, []).append(scored[i])
            i += 1
        out.append(d)
    return out


def score_case(handle: ModelHandle, case: EvalCase, mode: str = "packed") -> dict:
    """Teacher-forced scores of every probe of ``case`` with the new and the true target, all in one
    batched call (``mode``: the scoring mode of :func:`loka.scoring.score_targets`)."""
    return score_cases(handle, [case], mode)[0]


def _mean_lp(sc: dict) -> float:
    return float(np.mean(sc["token_logprobs"]))


def _token_acc(sc: dict) -> float:
    return float(np.mean([a == t for a, t in zip(sc["argmax_ids"], sc["target_ids"])]))


def _pairs(s: dict, group: str):
    g = s.get(group, {})
    if "new" not in g or "true" not in g:
        return []
    return list(zip(g["new"], g["true"]))


def _mean(xs):
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


# -- CounterFact (probability) -------------------------------------------------------------------
@metric("ES")
def efficacy_success(post, pre=None):
    """Fraction of edit prompts with P(new) > P(true) (mean per-token log-probabilities)."""
    return _mean(_mean_lp(a) > _mean_lp(b) for a, b in _pairs(post, "rewrite"))


@metric("PS")
def paraphrase_success(post, pre=None):
    return _mean(_mean_lp(a) > _mean_lp(b) for a, b in _pairs(post, "paraphrase"))


@metric("NS")
def neighborhood_success(post, pre=None):
    """Fraction of neighbourhood prompts that still prefer the true object: P(true) > P(new) (each
    prompt's own answer as "true" when the case gives one per prompt)."""
    return _mean(_mean_lp(b) > _mean_lp(a) for a, b in _pairs(post, "neighborhood"))


def _prob(sc):
    return math.exp(_mean_lp(sc))


@metric("EM")
def efficacy_magnitude(post, pre=None):
    """Mean P(new) − P(true) on edit prompts (per-token probabilities, as CounterFact)."""
    return _mean(_prob(a) - _prob(b) for a, b in _pairs(post, "rewrite"))


@metric("PM")
def paraphrase_magnitude(post, pre=None):
    return _mean(_prob(a) - _prob(b) for a, b in _pairs(post, "paraphrase"))


@metric("NM")
def neighborhood_magnitude(post, pre=None):
    return _mean(_prob(b) - _prob(a) for a, b in _pairs(post, "neighborhood"))


# -- EasyEdit (teacher-forced token accuracy) ----------------------------------------------------
@metric("reliability")
def reliability(post, pre=None):
    return _mean(_token_acc(sc) for sc in post.get("rewrite", {}).get("new", []))


@metric("generalization")
def generalization(post, pre=None):
    return _mean(_token_acc(sc) for sc in post.get("paraphrase", {}).get("new", []))


@metric("locality")
def locality(post, pre):
    """Fraction of out-of-scope target tokens whose argmax is the same before and after the edit."""
    if pre is None:
        return None
    same = []
    for group, which in (("neighborhood", "true"), ("locality", "answer")):
        for a, b in zip(post.get(group, {}).get(which, []), pre.get(group, {}).get(which, [])):
            same += [x == y for x, y in zip(a["argmax_ids"], b["argmax_ids"])]
    return _mean(same)


@metric("portability")
def portability(post, pre=None):
    return _mean(_token_acc(sc) for sc in post.get("portability", {}).get("answer", []))


# -- generation -----------------------------------------------------------------------------------
def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """CounterFact's GE for one text: weighted mean of the n-gram entropies (bits), n = 2, 3."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    ents = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        if total == 0:
            ents.append(0.0)
            continue
        f = np.array(list(grams.values()), dtype=float) / total
        ents.append(w * float(-(f * np.log2(f)).sum()))
    return float(np.mean(ents))


def _contains(text: str, answers) -> bool:
    t = text.lower()
    return any(a.strip().lower() in t for a in answers if a and a.strip())


def generation_scores(
    handle: ModelHandle, case: EvalCase, max_new_tokens: int = 10, ge_tokens: int = 40
) -> dict:
    """Greedy generations: success (target appears) on edit and paraphrase prompts, GE, multi-hop."""
    out: dict = {}
    prompts = case.rewrite + case.paraphrase
    if prompts:
        gens = generate(handle, prompts, max_new_tokens=max_new_tokens)
        out["gen_success"] = _mean(_contains(g, [case.target_new]) for g in gens)
        out["text"] = gens[0]  # the edit prompt's continuation, shown by reports
    if case.question:
        gens = generate(handle, [QA_PROMPT.format(case.question)], max_new_tokens=max_new_tokens)
        out["qa_success"] = float(_contains(gens[0], [case.target_new]))
    if case.generation:
        gens = generate(handle, case.generation, max_new_tokens=ge_tokens)
        out["GE"] = _mean(ngram_entropy(g) for g in gens)
    if case.multihop:
        gens = generate(
            handle, [f"Q: {q}\nA:" for q in case.multihop["questions"]], max_new_tokens=max_new_tokens
        )
        out["multihop"] = float(any(_contains(g, case.multihop["answers"]) for g in gens))
    return out


# -- WILD: answers by generation, as a user would get them ----------------------------------------
#: the question as WILD's ``qa_inst`` input ("The Mirage of Model Editing", ACL 2025)
WILD_PROMPT = "Please answer the question:\n\nQ: {}\nA:"
WILD_STOPS = (".", "\n")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def squad_normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's answer normalisation)."""
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split())


def wild_answer(text: str) -> str:
    """A generation cut at WILD's stop rule: the first ``.`` or newline after the answer began."""
    text = text.lstrip(" ")
    cut = min((i for i in (text.find(s) for s in WILD_STOPS) if i >= 0), default=len(text))
    return text[:cut].strip()


def wild_generations(handle: ModelHandle, cases: list[EvalCase], max_new_tokens: int = 24) -> list[dict]:
    """Per case, greedy answers (cut by :func:`wild_answer`) to its question (WILD's ``qa_inst`` input;
    the edit prompt where the case has no question), its paraphrase prompts and its neighbourhood
    prompts; all cases' prompts in one batched generation."""
    prompts, spans = [], []
    for c in cases:
        q = [WILD_PROMPT.format(c.question)] if c.question else c.rewrite[:1]
        parts = (q, list(c.paraphrase), list(c.neighborhood))
        spans.append([len(p) for p in parts])
        prompts += [p for part in parts for p in part]
    gens = generate(handle, prompts, max_new_tokens=max_new_tokens) if prompts else []
    out, i = [], 0
    for sizes in spans:
        d = {}
        for key, n in zip(("question", "paraphrase", "neighborhood"), sizes):
            d[key] = [wild_answer(g) for g in gens[i : i + n]]
            i += n
        out.append(d)
    return out


def _wild_match(answer: str, target: str, exact: bool) -> float:
    a, t = squad_normalise(answer), squad_normalise(target)
    return float(a == t if exact else bool(t) and t in a)


@metric("wild_em")
def wild_em(post, pre=None):
    """WILD reliability, exact: the normalised answer to the question is the normalised new target."""
    w = post.get("_wild")
    return _mean(_wild_match(a, w["target"], True) for a in w["question"]) if w else None


@metric("wild_success")
def wild_success(post, pre=None):
    """WILD reliability, containment: the normalised answer contains the normalised new target."""
    w = post.get("_wild")
    return _mean(_wild_match(a, w["target"], False) for a in w["question"]) if w else None


@metric("wild_para")
def wild_para(post, pre=None):
    """WILD generalisation: answers to the paraphrase prompts contain the new target."""
    w = post.get("_wild")
    return _mean(_wild_match(a, w["target"], False) for a in w["paraphrase"]) if w else None


@metric("wild_locality")
def wild_locality(post, pre=None):
    """WILD locality: neighbourhood prompts answered exactly as by the unedited model."""
    w, w0 = post.get("_wild"), (pre or {}).get("_wild")
    if not w or not w0:
        return None
    return _mean(float(a == b) for a, b in zip(w["neighborhood"], w0["neighborhood"]))


@metric("gen_success")
def gen_success(post, pre=None):
    return post.get("_gen", {}).get("gen_success")


@metric("qa_success")
def qa_success(post, pre=None):
    """The greedy answer to the case's question (``Question: …\\nAnswer:``) contains the new target."""
    return post.get("_gen", {}).get("qa_success")


@metric("GE")
def generation_entropy(post, pre=None):
    return post.get("_gen", {}).get("GE")


@metric("multihop")
def multihop(post, pre=None):
    """MQuAKE: the case counts as solved if any of its questions yields the new answer (or an alias)."""
    return post.get("_gen", {}).get("multihop")


def case_metrics(post: dict, pre: dict | None) -> dict:
    return {name: fn(post, pre) for name, fn in METRICS.items() if fn(post, pre) is not None}


def harmonic_mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals or any(v <= 0 for v in vals):
        return 0.0 if vals else None
    return len(vals) / sum(1 / v for v in vals)
