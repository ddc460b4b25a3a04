"""``loka kg run``: intervene on a knowledge graph with any method and measure the propagation.

One run = one (method, level, scale): interventions and probes from :mod:`loka.bench.probes`, the
model's choices on every probe before and after the update, the KnowledgeSmith diagnostics
(:mod:`loka.eval.kg_metrics`), representation similarity on a fixed probe sample and the SVD
geometry of every changed matrix. Editing and unlearning go through the same call (the unified
objective: the target is a new object or a neutral answer).

A run folder holds ``summary.json``, ``probes.jsonl`` (every probe with its before/after choice),
``interventions.jsonl`` and ``before.json`` — the pre-update choices, reused by a rerun when the
model hash, probes and scoring match (a₀ is computed once per model).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..bench.kg import KnowledgeGraph, Triple
from ..bench.probes import Probe, generate_probes, retain_requests
from ..errors import RequestError
from ..methods import get_method
from ..scoring import target_logprobs
from ..utils.io import atomic_write_bytes, atomic_write_json, cached_json, hash_json
from ..utils.progress import bar as progress_bar
from . import kg_metrics as km

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

log = logging.getLogger(__name__)

#: methods that only unlearn: ``loka kg run`` gives them forget interventions unless --task says otherwise
SCORINGS = ("cloze", "mc")


def choose(
    handle: ModelHandle,
    probes: list[Probe],
    scoring: str = "cloze",
    batch_size: int = 32,
    progress: bool = False,
) -> list[int]:
    """The option each probe's model picks: highest summed log-probability of the option after the
    cloze prompt (``cloze``) or of the letter after the MMLU prompt (``mc``)."""
    if scoring not in SCORINGS:
        raise RequestError(f"scoring must be one of {SCORINGS} (got {scoring!r})")
    prompts, targets = [], []
    for p in probes:
        if scoring == "cloze":
            prompts += [p.cloze] * len(p.options)
            targets += [" " + o for o in p.options]
        else:
            prompts += [p.mc_prompt()] * len(p.options)
            targets += [" " + chr(65 + i) for i in range(len(p.options))]
    out: list[int] = []
    step = 512
    bar = progress_bar(total=len(prompts), desc=f"probes ({scoring})", unit="row", disable=not progress)
    lps: list[dict] = []
    for s in range(0, len(prompts), step):
        lps += target_logprobs(handle, prompts[s : s + step], targets[s : s + step], batch_size=batch_size)
        bar.update(min(step, len(prompts) - s))
    bar.close()
    i = 0
    for p in probes:
        scores = [lps[i + j]["logprob"] for j in range(len(p.options))]
        out.append(max(range(len(scores)), key=scores.__getitem__))
        i += len(p.options)
    return out


@torch.no_grad()
def representations(
    handle: ModelHandle, prompts: list[str], batch_size: int = 16
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Next-token log-probabilities (n × V) and every layer's hidden state at the last prompt token
    (a list of n × d), right-padded batches so positions are those of an unpadded prompt. With a
    context artifact applied (SCR) the prompts carry their retrieved facts, as in scoring."""
    from ..runtime import rewrite_prompts

    prompts = rewrite_prompts(handle, prompts)
    tok, model = handle.tokenizer, handle.model
    logps, hidden = [], None
    for s in range(0, len(prompts), batch_size):
        ids = [tok(p)["input_ids"] for p in prompts[s : s + batch_size]]
        n = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        inp = torch.tensor([x + [pad] * (n - len(x)) for x in ids], device=handle.device)
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids], device=handle.device)
        last = torch.tensor([len(x) - 1 for x in ids], device=handle.device)
        out = model(input_ids=inp, attention_mask=mask, output_hidden_states=True)
        rows = torch.arange(len(ids), device=handle.device)
        logps.append(F.log_softmax(out.logits[rows, last].float(), -1).cpu())
        hs = [h[rows, last].float().cpu() for h in out.hidden_states[1:]]
        hidden = hs if hidden is None else [torch.cat([a, b]) for a, b in zip(hidden, hs)]
    return torch.cat(logps), hidden or []


def known_triples(
    handle: ModelHandle,
    g: KnowledgeGraph,
    level: str,
    domains: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """The candidate triples at ``level`` the model gets right, with the objects it ranks below the truth.

    Each candidate ``(s, r, o)`` is asked as its relation's cloze prompt with ``o`` and three other
    same-type objects; it is *known* when ``o`` scores highest. Returns ``{triple: [the three others]}``
    for the known ones: an edit then moves the fact to an object the model did not already prefer."""
    import random

    from ..bench.probes import _cap, candidate_triples

    cands = candidate_triples(g, level, "forget", domains)
    prompts, targets, others = [], [], []
    for i, t in enumerate(cands):
        rng = random.Random(f"known-{seed}-{i}")
        free = [x for x in g.pool(t.relation, "tail") if x not in g.tails(t.head, t.relation)]
        alt = rng.sample(free, 3)
        others.append(alt)
        prompts += [_cap(g.relations[t.relation].prompt(g.name_of(t.head)))] * 4
        targets += [" " + g.name_of(x) for x in [t.tail, *alt]]
    lps = target_logprobs(handle, prompts, targets, batch_size=batch_size)
    out = {}
    for i, t in enumerate(cands):
        sc = [lps[4 * i + j]["logprob"] for j in range(4)]
        if max(range(4), key=sc.__getitem__) == 0:
            out[t] = others[i]
    return out


def _repr_sample(probes: list[Probe], n: int) -> tuple[list[str], int]:
    """A fixed, balanced sample of distinct cloze prompts — contextual first (at most half), then Q+ —
    and how many of them are contextual."""
    ctx = list(dict.fromkeys(p.cloze for p in probes if p.type == "contextual"))[: n // 2]
    plus = list(dict.fromkeys(p.cloze for p in probes if p.type != "contextual"))[: n - len(ctx)]
    return ctx + plus, len(ctx)


def geometry(handle: ModelHandle, art, r: int = 32) -> dict:
    """SVD geometry of every matrix the artifact changes (weight deltas and adapters; none for
    memory/context artifacts, whose weights stay as they were)."""
    deltas = art.weight_deltas()  # empty for memory / context / bundle artifacts
    params = dict(handle.model.named_parameters())
    out = {}
    for name, d in deltas.items():
        if name not in params or params[name].dim() != 2:
            continue
        w = params[name].detach().double().cpu()
        dd = d.double().cpu().reshape(w.shape) if d.numel() == w.numel() else None
        if dd is None or not torch.any(dd != 0):
            continue
        out[name] = km.svd_geometry(w, w + dd, r)
    return out


def run_kg(
    handle: ModelHandle,
    graph: KnowledgeGraph,
    method: str,
    level: str,
    scale: int,
    *,
    task: str | None = None,
    seed: int = 0,
    domains: list[str] | None = None,
    phrasings: int = 3,
    n_context: int = 6,
    scoring: str = "cloze",
    hparams: dict | None = None,
    retain_n: int | None = None,
    repr_n: int = 256,
    out_dir: str | Path | None = None,
    graph_name: str = "",
    progress: bool = True,
    save_artifact: bool = False,
    known_first: bool = True,
) -> dict:
    """Run one intervention setting end to end; the model is left as it was. Returns the summary.

    ``known_first``: intervene first on facts the model answers right before the update (within each
    domain); unlearning a fact the model never knew measures nothing. The summary says how many were known."""
    from ..api import edit, unlearn

    m = get_method(method)
    task = task or m.primary
    if task == "edit" and m.primary == "forget":
        raise RequestError(f"method {method!r} only unlearns; use --task forget or an editing method")
    t0 = time.time()
    known = known_triples(handle, graph, level, domains, seed) if known_first else {}
    ivs, probes = generate_probes(
        graph, level, scale, task, seed, domains, phrasings, n_context, prefer=known
    )
    n_known = sum(Triple(iv.head, iv.relation, iv.old) in known for iv in ivs)
    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            out / "interventions.jsonl", "".join(json.dumps(asdict(iv)) + "\n" for iv in ivs).encode()
        )
    key = hash_json(
        {
            "model": handle.model_hash,
            "probes": [p.to_dict() for p in probes],
            "scoring": scoring,
            "repr_n": repr_n,
        }
    )

    def before_choices():
        return choose(handle, probes, scoring, progress=progress)

    before = (
        cached_json(out / "before.json", key, before_choices, field="choices") if out else before_choices()
    )
    sample, n_ctx = _repr_sample(probes, repr_n)
    lp0, h0 = representations(handle, sample)
    requests = [iv.request(graph) for iv in ivs]
    t1 = time.time()
    if task == "edit":
        art = edit(handle, requests, method, hparams, progress=progress)
    else:
        n_ret = retain_n if retain_n is not None else min(max(2 * scale, 10), 100)
        retain = retain_requests(graph, ivs, probes, n_ret, seed) if n_ret else []
        art = unlearn(handle, requests, retain, method, hparams, progress=progress)
    update_s = time.time() - t1
    try:
        after = choose(handle, probes, scoring, progress=progress)
        lp1, h1 = representations(handle, sample)
        geo = geometry(handle, art)
        if out and save_artifact:
            art.save(out / "artifact", force=True)  # the run folder is loka's own
    finally:
        art.revert(handle)
    facts = {iv.index: (iv.old, iv.new) for iv in ivs}
    rows = []
    for p, b, a in zip(probes, before, after):
        d = p.to_dict()
        d.update(before=b, after=a)
        rows.append(d)
    kl = km.kl_divergence(lp0, lp1)
    cka = [km.linear_cka(a, b) for a, b in zip(h0, h1)]
    summary = {
        "model": handle.name,
        "model_hash": handle.model_hash,
        "graph": graph_name or graph.name,
        "method": method,
        "task": task,
        "level": level,
        "scale": scale,
        "seed": seed,
        "domains": domains or graph.domains(),
        "scoring": scoring,
        "phrasings": phrasings,
        "known_first": known_first,
        "known_interventions": n_known,
        "known_at_level": len(known),
        "artifact": art.id,
        "hparams": art.manifest.get("hparams", {}),
        **km.summarise(rows, facts),
        "by_domain": {
            d: {
                k: v
                for k, v in km.summarise([r for r in rows if r["domain"] == d], facts).items()
                if k in ("ccr", "rr", "conflict_rate", "interventions", "by_type")
            }
            for d in sorted({r["domain"] for r in rows})
        },
        "kl": float(kl.mean()),
        "kl_context": float(kl[:n_ctx].mean()) if n_ctx else None,
        "kl_plus": float(kl[n_ctx:].mean()) if len(kl) > n_ctx else None,
        "cka": sum(cka) / len(cka) if cka else None,
        "cka_last": cka[-1] if cka else None,
        "cka_layers": cka,
        "geometry": geo,
        "geometry_mean": {
            k: sum(g[k] for g in geo.values()) / len(geo)
            for k in ("scale_spread", "scale_max", "scale_min", "rot_u", "rot_v", "rel_change")
        }
        if geo
        else {},
        "seconds": {"update": round(update_s, 1), "total": round(time.time() - t0, 1)},
    }
    if out:
        atomic_write_bytes(out / "probes.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        atomic_write_json(out / "summary.json", summary)
    return summary


def format_summary(s: dict) -> str:
    """A few lines for the terminal."""

    def f(x):
        return "  -  " if x is None else f"{x:.3f}"

    lines = [
        f"{s['method']} ({s['task']}) at {s['level']} level, {s['interventions']} intervention(s) "
        f"({s.get('known_interventions', '?')} known before), "
        f"{s['probes']} probes, scoring {s['scoring']}; update {s['seconds']['update']}s, total {s['seconds']['total']}s",
        f"{'probe type':12s} {'n':>5s} {'target after':>13s} {'orig before':>12s} {'orig after':>11s}",
    ]
    for t, a in s["by_type"].items():
        lines.append(
            f"{t:12s} {a['n']:5d} {f(a['target_after']):>13s} {f(a['original_before']):>12s} "
            f"{f(a['original_after']):>11s}"
        )
    lines.append(
        f"CCR {f(s['ccr'])} (near {f(s['ccr_near'])}, far {f(s['ccr_far'])})   RR {f(s['rr'])}   "
        f"conflict {f(s['conflict_rate_before'])} -> {f(s['conflict_rate'])}   "
        f"inconsistency {f(s['inconsistency_before'])} -> {f(s['inconsistency'])}"
    )
    lines.append(
        f"KL {f(s['kl'])} (contextual {f(s['kl_context'])}, Q+ {f(s['kl_plus'])})   "
        f"CKA {f(s['cka'])} (last layer {f(s['cka_last'])})"
    )
    g = s.get("geometry_mean") or {}
    if g:
        lines.append(
            f"SVD over {len(s['geometry'])} matrices: scaling spread {g['scale_spread']:.2e}, "
            f"σ'/σ in [{g['scale_min']:.4f}, {g['scale_max']:.4f}], rotation U {g['rot_u']:.2e} V {g['rot_v']:.2e}, "
            f"‖Δ‖/‖W‖ {g['rel_change']:.2e}"
        )
    return "\n".join(lines)
