"""KnowledgeSmith diagnostics (ICLR 2026). The paper's formulas were not readable, so
these are loka's definitions, stated here and in the README:

- **CCR** (collateral change ratio, over-spreading): the fraction of should-not-change probes (Q−,
  the contextual ones) whose chosen option changed, ``|{q ∈ Q− : a₁(q) ≠ a₀(q)}| / |Q−|`` — measured
  against the model's own answer before the update, not against the ground truth.
- **RR** (residual retention, under-spreading): the fraction of Q+ probes that still choose the
  option that was true before the update, ``|{q ∈ Q+ : a₁(q) = original(q)}| / |{q ∈ Q+ : original(q) exists}|``.
- **conflict rate**: per intervention, the objects its direct, conflict, comparison and reverse
  probes (all phrasings) assert for ``(s, r)``. It is in conflict when some probe asserts the
  pre-update object while another asserts a different one — the updated object for an edit ("Paris
  is the capital of Germany" and "… of France"), any other object for unlearning (forgotten in one
  context, kept in another). Rate = interventions in conflict / interventions.
  ``inconsistency_rate`` is the looser reading: ≥ 2 different objects asserted, or a reverse answer
  denying an object another probe asserts.
- **KL**: mean over prompts of ``KL(p_θ(·|q) ‖ p_θ'(·|q))`` on the next-token distribution.
- **linear CKA** of hidden states, column-centred: ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)``.
- **log-min-max** normalisation across settings: ``(log(v+ε) − min) / (max − min)``.
- **SVD geometry** of ``W → W'``: per-index ratios ``σ'_i/σ_i`` (mean, max, min and the spread: the
  standard deviation of ``log σ'_i/σ_i``; anisotropic scaling = large spread) and rotation of the
  top-r singular subspaces, ``1 − ‖U_rᵀU'_r‖²_F / r`` (same for V).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch

from .metrics import _mean


def accuracy(rows: Iterable[dict], key: str = "target", when: str = "after") -> float | None:
    """Fraction of probes whose chosen option (``when`` = "before"/"after") is ``row[key]`` (rows with
    no such option are skipped)."""
    return _mean([float(r[when] == r[key]) for r in rows if r.get(key) is not None])


def ccr(rows: Iterable[dict]) -> float | None:
    """Collateral change ratio over the contextual (Q−) probes."""
    return _mean([float(r["after"] != r["before"]) for r in rows if r["type"] == "contextual"])


def rr(rows: Iterable[dict]) -> float | None:
    """Residual retention: Q+ probes that still choose the pre-update answer."""
    return _mean(
        [
            float(r["after"] == r["original"])
            for r in rows
            if r["type"] != "contextual" and r.get("original") is not None
        ]
    )


CONFLICT_TYPES = ("direct", "conflict", "comparison", "reverse")


def _asserted(claims: Iterable[str]) -> tuple[set[str], set[str]]:
    claims = [c for c in claims if c]
    return {c for c in claims if not c.startswith("not:")}, {c[4:] for c in claims if c.startswith("not:")}


def in_conflict(claims: Iterable[str], old: str, new: str | None = None) -> bool:
    """Claims are object ids, ``"not:<id>"`` (a reverse answer denying it) or ``""`` (no claim).
    Conflict: ``old`` asserted and ``new`` asserted too (edit), or ``old`` and any other object (``new`` None)."""
    objs, denied = _asserted(claims)
    if new is not None:
        return old in objs and new in objs
    return old in objs and (len(objs) >= 2 or old in denied)


def inconsistent(claims: Iterable[str]) -> bool:
    """≥ 2 different objects asserted, or an asserted object denied by a reverse answer."""
    objs, denied = _asserted(claims)
    return len(objs) >= 2 or bool(objs & denied)


def _claims_by_iv(rows: Iterable[dict], when: str) -> dict[int, list[str]]:
    by_iv: dict[int, list[str]] = defaultdict(list)
    for r in rows:
        if r["type"] in CONFLICT_TYPES and r.get("claims"):
            by_iv[r["intervention"]].append(r["claims"][r[when]])
    return by_iv


def conflict_rate(
    rows: list[dict], facts: dict[int, tuple[str, str | None]], when: str = "after"
) -> float | None:
    """Fraction of interventions whose probes assert both the pre-update object and another (the
    updated one for edits). ``facts``: intervention index → (old object id, new object id or None)."""
    by_iv = _claims_by_iv(rows, when)
    return _mean([float(in_conflict(c, *facts[i])) for i, c in by_iv.items()])


def inconsistency_rate(rows: list[dict], when: str = "after") -> float | None:
    return _mean([float(inconsistent(c)) for c in _claims_by_iv(rows, when).values()])


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p ‖ q) from log-probabilities (rows × vocabulary)."""
    logp, logq = logp.double(), logq.double()
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two representations of the same n inputs (n × d each; d may differ)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    num = (y.T @ x).pow(2).sum()
    den = (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den) if den > 0 else float("nan")


def log_minmax(values: Sequence[float], eps: float = 1e-8) -> list[float]:
    """log-min-max normalisation across settings; all-equal values map to 0."""
    logs = [math.log(v + eps) for v in values]
    lo, hi = min(logs), max(logs)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in logs]


@torch.no_grad()
def svd_geometry(w: torch.Tensor, w2: torch.Tensor, r: int = 32) -> dict:
    """Scaling and rotation of ``w → w2`` (KnowledgeSmith's SVD view), in float64."""
    w, w2 = w.double(), w2.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u2, s2, vh2 = torch.linalg.svd(w2, full_matrices=False)
    keep = s > s[0] * 1e-12
    ratio = s2[keep] / s[keep]
    lr = ratio.log()
    r = min(r, u.shape[1])
    rot_u = 1 - float((u[:, :r].T @ u2[:, :r]).pow(2).sum()) / r
    rot_v = 1 - float((vh[:r] @ vh2[:r].T).pow(2).sum()) / r
    return {
        "scale_mean": float(ratio.mean()),
        "scale_max": float(ratio.max()),
        "scale_min": float(ratio.min()),
        "scale_spread": float(lr.std()) if lr.numel() > 1 else 0.0,
        "rot_u": max(rot_u, 0.0),
        "rot_v": max(rot_v, 0.0),
        "rank": r,
        "rel_change": float((w2 - w).norm() / w.norm()),
        "sigma_max": float(s[0]),
        "sigma_max_after": float(s2[0]),
    }


def summarise(rows: list[dict], facts: dict[int, tuple[str, str | None]]) -> dict:
    """Every probe diagnostic of one run: CCR, RR, conflict rate, accuracies per type (before/after)."""
    out: dict = {
        "probes": len(rows),
        "interventions": len({r["intervention"] for r in rows}),
        "ccr": ccr(rows),
        "rr": rr(rows),
        "ccr_near": ccr([r for r in rows if r.get("scope") == "near"]),
        "ccr_far": ccr([r for r in rows if r.get("scope") == "far"]),
        "conflict_rate": conflict_rate(rows, facts),
        "conflict_rate_before": conflict_rate(rows, facts, "before"),
        "inconsistency": inconsistency_rate(rows),
        "inconsistency_before": inconsistency_rate(rows, "before"),
    }
    acc: dict = {}
    for t in sorted({r["type"] for r in rows}):
        sub = [r for r in rows if r["type"] == t]
        acc[t] = {
            "n": len(sub),
            "target_after": accuracy(sub),
            "original_before": accuracy(sub, "original", "before"),
            "original_after": accuracy(sub, "original", "after"),
        }
    out["by_type"] = acc
    return out
