"""TOFU-style unlearning metrics (Maini et al. 2024) and LOKA's joint-task names (arXiv 2502.00158).

* normalised probability ``P̄(a|q) = exp(−ℓ(a|q))`` with ``ℓ`` the mean token NLL of the answer;
* truth ratio per question ``R = exp(ℓ(ã|q) − mean_j ℓ(â_j|q))`` (paraphrased answer ã, perturbed
  answers â_j; TOFU's code form), aggregated as ``mean(min(R, 1/R))`` on a forget set and
  ``mean(max(0, 1 − R))`` on retain-like sets;
* ROUGE-L recall of a greedy generation against the answer (``rouge-score``);
* forget quality: the two-sample Kolmogorov–Smirnov p-value between the forget-set truth ratios of
  the unlearned model and of a model that never saw the forget set;
* model utility: the harmonic mean of the retain-side numbers.

LOKA's names for a joint edit + forget task: ``unl-tr`` (forget truth ratio), ``unl-rl`` (ROUGE-L
recall of the forgotten answer, lower is better), ``edt-rl`` / ``edt-prl`` (ROUGE-L recall of the new
answer on edit prompts / their paraphrases), ``rem-tr`` / ``rem-rl`` (truth ratio and ROUGE-L on the
remaining facts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..scoring import generate, target_logprobs

if TYPE_CHECKING:
    from ..models.loader import ModelHandle


def normalised_prob(mean_logprob: float) -> float:
    """``P̄ = P(a|q)^{1/|a|} = exp(mean token log-probability)``."""
    return math.exp(mean_logprob)


def truth_ratio(paraphrased_mean_nll: float, perturbed_mean_nlls: Sequence[float]) -> float:
    """``R = exp(ℓ(ã) − mean_j ℓ(â_j))`` (mean token NLLs): below 1 when the true answer is preferred."""
    return math.exp(paraphrased_mean_nll - float(np.mean(perturbed_mean_nlls)))


def truth_ratio_forget(ratios: Sequence[float]) -> float:
    """Forget-set aggregation ``mean(min(R, 1/R))``: 1 when the model cannot tell true from false."""
    return float(np.mean([min(r, 1.0 / r) for r in ratios]))


def truth_ratio_retain(ratios: Sequence[float]) -> float:
    """Retain-set aggregation ``mean(max(0, 1 − R))``: high when the true answer is clearly preferred."""
    return float(np.mean([max(0.0, 1.0 - r) for r in ratios]))


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall (``rouge_score``'s ``rougeL`` recall, no stemming): LCS / reference tokens."""
    from rouge_score import rouge_scorer

    return float(
        rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)["rougeL"].recall
    )


def forget_quality(truth_ratios: Sequence[float], reference_truth_ratios: Sequence[float]) -> float:
    """KS two-sample p-value between forget-set truth ratios and those of the never-trained reference."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(list(truth_ratios), list(reference_truth_ratios)).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the retain-side numbers (0 if any is 0)."""
    vals = [float(v) for v in values]
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


# -- computed on a model ------------------------------------------------------------------------
def mean_nlls(handle: ModelHandle, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Mean token NLL of each answer after its prompt (teacher forcing, one batched scoring call)."""
    return [-r["mean_logprob"] for r in target_logprobs(handle, list(prompts), list(answers))]


def _answer_nlls(
    handle: ModelHandle, prompts: Sequence[str], answers: Sequence[str], perturbed: Sequence[Sequence[str]]
) -> tuple[list[float], list[list[float]]]:
    """Mean token NLL of each answer and of each of its perturbed answers (two batched scorings)."""
    flat_p = [q for q, alts in zip(prompts, perturbed) for _ in alts]
    flat_a = [a for alts in perturbed for a in alts]
    pert = mean_nlls(handle, flat_p, flat_a)
    per, k = [], 0
    for alts in perturbed:
        per.append(pert[k : k + len(alts)])
        k += len(alts)
    return mean_nlls(handle, prompts, answers), per


def truth_ratios(
    handle: ModelHandle,
    prompts: Sequence[str],
    paraphrased: Sequence[str],
    perturbed: Sequence[Sequence[str]],
) -> list[float]:
    """Per question ``R`` from the paraphrased answer and its perturbed (wrong) answers."""
    para, per = _answer_nlls(handle, prompts, paraphrased, perturbed)
    return [truth_ratio(p, alts) for p, alts in zip(para, per)]


def rouge_recalls(
    handle: ModelHandle, prompts: Sequence[str], answers: Sequence[str], max_new_tokens: int = 16
) -> list[float]:
    """ROUGE-L recall of each greedy continuation against its answer."""
    gens = []
    for i in range(0, len(prompts), 16):
        gens += generate(handle, list(prompts[i : i + 16]), max_new_tokens=max_new_tokens)
    return [rouge_l_recall(g, a) for g, a in zip(gens, answers)]


def answer_stats(
    handle: ModelHandle, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> list[dict]:
    """Per (prompt, answer): normalised probability ``P̄`` and teacher-forced exact match (every
    answer token is the argmax) — the forget/keep check used by ``loka unlearn`` and the benchmarks."""
    import torch

    from ..runtime import route_groups
    from . import losses as L

    out: list[dict] = [{}] * len(prompts)
    with torch.no_grad():
        for select, idx in route_groups(handle, list(prompts)):  # a codebook: routed on the prompt
            for i in range(0, len(idx), batch_size):
                part = idx[i : i + batch_size]
                b = L.qa_batch(handle.tokenizer, [prompts[j] for j in part], [answers[j] for j in part])
                with select():
                    lg, rows = L.answer_logits(handle, b)
                lp, n = L.sequence_logprobs(lg, rows, b)
                em = L.exact_match(lg, rows, b)
                for j, a, c, e in zip(part, lp, n, em):
                    out[j] = {"p_norm": math.exp(float(a) / float(c)), "em": float(e)}
    return out


def joint_metrics(handle: ModelHandle, task: dict, max_new_tokens: int = 8) -> dict:
    """LOKA's six numbers for a joint edit + forget task (:func:`loka.bench.tasks.build_tasks`).

    For short factual answers the "paraphrased answer" of the truth ratio is the answer itself and
    the perturbed answers are other objects of the relation (``perturbed``)."""

    def tr(facts):
        prompts = [f["prompt"].replace("{}", f["subject"]) for f in facts]
        return truth_ratios(handle, prompts, [f["answer"] for f in facts], [f["perturbed"] for f in facts])

    def rl(prompts, answers):
        return (
            float(np.mean(rouge_recalls(handle, prompts, answers, max_new_tokens)))
            if prompts
            else float("nan")
        )

    forget, rem, edits = task["forget"], task["remaining"], task["edit"]
    e_prompts = [
        e["requested_rewrite"]["prompt"].replace("{}", e["requested_rewrite"]["subject"]) for e in edits
    ]
    e_new = [e["requested_rewrite"]["target_new"] for e in edits]
    e_new = [x["str"] if isinstance(x, dict) else x for x in e_new]
    para = [(p, a) for e, a in zip(edits, e_new) for p in e.get("paraphrase_prompts", [])]
    return {
        "unl-tr": truth_ratio_forget(tr(forget)),
        "unl-rl": rl(
            [f["prompt"].replace("{}", f["subject"]) for f in forget], [f["answer"] for f in forget]
        ),
        "edt-rl": rl(e_prompts, e_new),
        "edt-prl": rl([p for p, _ in para], [a for _, a in para]),
        "rem-tr": truth_ratio_retain(tr(rem)),
        "rem-rl": rl([f["prompt"].replace("{}", f["subject"]) for f in rem], [f["answer"] for f in rem]),
    }


def tofu_eval(
    handle: ModelHandle,
    forget: Sequence[dict],
    retain: Sequence[dict],
    real_authors: Sequence[dict] = (),
    world_facts: Sequence[dict] = (),
    reference: Sequence[float] | None = None,
    max_new_tokens: int = 32,
) -> dict:
    """TOFU's evaluation on QA records ``{question, answer, perturbed_answer[, paraphrased_question]}``.

    Per set: ``p`` (P̄ of the answer; on real authors / world facts normalised against the perturbed
    options, ``P̄(a) / (P̄(a) + Σ P̄(â_j))`` as TOFU does), ``rouge`` (ROUGE-L recall of a greedy
    answer), ``tr`` (truth ratio, the answer itself standing in for TOFU's paraphrased answer; forget
    set aggregated ``mean(min(R, 1/R))``, the others ``mean(max(0, 1 − R))``). ``model_utility`` is the
    harmonic mean of the nine retain-side numbers that exist; ``forget_quality`` the KS p-value of the
    forget truth ratios against ``reference`` (the same ratios from a model never trained on the
    forget set), when given. ``forget_tr_raw`` keeps the per-question ratios for that comparison.
    """
    from ..requests import QA_PROMPT

    def sets(recs):
        q = [QA_PROMPT.format(r["question"]) for r in recs]
        a = [r["answer"] for r in recs]
        return q, a

    out: dict = {}
    utility = []
    for name, recs in (
        ("forget", forget),
        ("retain", retain),
        ("real_authors", real_authors),
        ("world_facts", world_facts),
    ):
        if not recs:
            continue
        q, a = sets(recs)
        nll, pert = _answer_nlls(
            handle, q, a, [r["perturbed_answer"] for r in recs]
        )  # scored once, used twice
        ratios = [truth_ratio(t, alts) for t, alts in zip(nll, pert)]
        p = [math.exp(-t) for t in nll]
        if name in ("real_authors", "world_facts"):  # P̄ normalised over the options
            p = [pt / (pt + sum(math.exp(-x) for x in alts)) for pt, alts in zip(p, pert)]
        row = {
            "p": float(np.mean(p)),
            "rouge": float(np.mean(rouge_recalls(handle, q, a, max_new_tokens))),
            "tr": truth_ratio_forget(ratios) if name == "forget" else truth_ratio_retain(ratios),
        }
        if name == "forget":
            out["forget_tr_raw"] = ratios
            if any(r.get("paraphrased_question") for r in recs):
                pq = [QA_PROMPT.format(r.get("paraphrased_question") or r["question"]) for r in recs]
                row["para_rouge"] = float(np.mean(rouge_recalls(handle, pq, a, max_new_tokens)))
        else:
            utility += [row["p"], row["rouge"], row["tr"]]
        out[name] = row
    if utility:
        out["model_utility"] = model_utility(utility)
    if reference is not None and "forget_tr_raw" in out:
        out["forget_quality"] = forget_quality(out["forget_tr_raw"], reference)
    return out
