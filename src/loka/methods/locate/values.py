"""The value search: ROME's ``compute_v`` / MEMIT's ``compute_z`` for many requests at once.

``δ_i`` is added at the subject's last token (to the rewritten matrix's output, or to the residual
stream after block ``l``) and optimised with Adam on ROME's Eq. 4 loss,

    NLL(o* | ctx ⊕ p(s)) + kl_factor · KL(p_δ ‖ p_0) + v_weight_decay · ‖δ‖ / ‖v_0‖²,

under the norm clamp ``‖δ‖ ≤ clamp_norm_factor · ‖v_0‖``. A request stops (its ``δ`` is frozen and its
rows dropped) once its target NLL is below ``early_stop_loss`` (ROME tests the total loss, whose
decay term alone can stay above it). The rows are split into groups that pad little
(:mod:`.grouping`); :func:`_search` is the one optimisation loop for every grouping.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ...errors import LokaError
from ...fastlinear import packed_linears
from ...hf_compat import native_gqa
from ...requests import EditRequest
from ...trace import add_at_positions
from .grouping import GROUP_MIN_REQUESTS, GROUPINGS, KL_GROUP_MIN_REQUESTS, suffix_buckets, suffix_len
from .prompts import PromptBatch, build_prompts, mean_over_templates
from .replay import Replay, _ActiveView

if TYPE_CHECKING:
    from ...models.loader import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class ValueResult:
    targets: torch.Tensor  # (n, d) optimised values v* = v_0 + δ
    init: torch.Tensor  # (n, d) original values v_0 at the plain prompt
    keys: torch.Tensor  # (n, d_in) keys of ``key_layer`` averaged over templates (k*)
    plain_keys: torch.Tensor  # (n, d_in) keys at the plain prompt
    nll: list[float]  # final NLL of the target per request
    steps: int
    timings: dict = None  # seconds: "keys" (reference forwards), "values" (optimisation)


def optimize_values(
    handle: ModelHandle,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[str],
    hp,
    *,
    where: str = "mlp_out",
    key_layer: int | None = None,
    progress=None,
) -> ValueResult:
    """Optimise one vector per request so that the target becomes likely (see module docstring).

    ``where="mlp_out"``: δ is added to the output of ``layer``'s rewritten matrix (ROME);
    ``where="block_out"``: to the residual stream after block ``layer`` (MEMIT's ``z``).
    Requests are processed ``hp.v_batch_size`` at a time; each chunk shares its forward passes.
    """
    key_layer = layer if key_layer is None else key_layer
    grouping = getattr(hp, "v_grouping", "auto")
    if grouping not in GROUPINGS:
        raise LokaError(
            f"hyperparameter v_grouping must be one of {', '.join(map(repr, GROUPINGS))}, got {grouping!r}"
        )
    order = list(range(len(requests)))
    lens = [suffix_len(handle.tokenizer, r) for r in requests] if grouping != "none" else None
    if lens is not None:  # chunks of requests with similar suffix lengths pad less
        order.sort(key=lambda i: lens[i])
    chunks = [order[i : i + hp.v_batch_size] for i in range(0, len(order), hp.v_batch_size)]
    outs = []
    _search_precision(handle, hp)  # a wrong v_dtype fails before any forward
    with _packed_search(handle, layer, hp, len(requests)), native_gqa(handle.device):
        for idx in chunks:
            chunk = [requests[i] for i in idx]
            mode = (
                grouping
                if grouping != "auto"
                else (
                    "suffix"
                    if len(idx) >= GROUP_MIN_REQUESTS
                    else "kl"
                    if len(idx) >= KL_GROUP_MIN_REQUESTS
                    else "none"
                )
            )
            outs.append(
                _optimize(
                    handle,
                    chunk,
                    layer,
                    templates,
                    hp,
                    where,
                    key_layer,
                    mode=mode,
                    suffix_lens=[lens[i] for i in idx] if lens else None,
                )
            )
            if progress is not None:
                progress.update(len(idx))
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # chunk order -> request order
    cat = lambda name: torch.cat([getattr(o, name) for o in outs])[back]  # noqa: E731
    nll = [x for o in outs for x in o.nll]
    return ValueResult(
        targets=cat("targets"),
        init=cat("init"),
        keys=cat("keys"),
        plain_keys=cat("plain_keys"),
        nll=[nll[int(i)] for i in back],
        steps=max(o.steps for o in outs),
        timings={k: sum(o.timings[k] for o in outs) for k in ("keys", "values")},
    )


def _packed_search(handle: ModelHandle, layer: int, hp, n_requests: int):
    """Prepacked frozen weights (:mod:`loka.fastlinear`) for the value search; ``Wᵀ`` is packed only
    where gradients flow (above δ).

    A few requests (ROME, small batches): only the blocks the search replays, ``layer`` and above, and
    the unembedding are packed; the blocks below run once, in the reference forward of a handful of
    rows, on the model's own weights, and a bfloat16 search runs that float32 forward unpacked too —
    packing every matrix for one small forward costs about what it saves and holds a second copy of
    the model (ROME's peak memory). A batch packs every matrix: its reference forward runs hundreds
    of rows, and MEMIT's key passes use the same copies afterwards."""
    if n_requests >= KL_GROUP_MIN_REQUESTS:
        return packed_linears(handle).active(handle.model, grad=True)
    blocks = [handle.block(i) for i in range(layer, handle.n_layers)] + [handle.module(handle.spec.unembed)]
    dense = torch.float32 if getattr(hp, "v_dtype", "float32") == "bfloat16" else None
    return packed_linears(handle).active(
        handle.model, grad=True, modules=[m for b in blocks for m in b.modules()], dense=dense
    )


def _search_precision(handle: ModelHandle, hp):
    """The precision of the value search's forwards: ``hp.v_dtype`` "float32" (default) or
    "bfloat16".

    bfloat16 runs the matmuls on bfloat16 copies of the packed weights (activations cast for the
    product only; norms, attention and the residual stream stay float32: ~1.9× per matmul on CPUs
    with AVX-512 BF16), or under ``torch.autocast`` where packed weights are not in use. The
    reference keys and values and every solve stay float32/float64 either way.
    """
    dt = getattr(hp, "v_dtype", "float32")
    if dt not in ("float32", "bfloat16"):
        raise LokaError(f"hyperparameter v_dtype must be 'float32' or 'bfloat16', got {dt!r}")
    if dt == "float32":
        return contextlib.nullcontext()
    packed = packed_linears(handle)
    if packed.on and packed.supports(torch.bfloat16):
        return packed.compute(torch.bfloat16)
    return torch.autocast(handle.device.type, dtype=torch.bfloat16)


def _prefix_tree(hp) -> bool:
    """``hp.v_prefix_tree`` (default on): the reference forward runs shared prefixes once."""
    return bool(getattr(hp, "v_prefix_tree", True))


@torch.no_grad()
def _project(delta: torch.Tensor, max_norm: torch.Tensor, active: torch.Tensor, frozen: torch.Tensor) -> None:
    """After an Adam step: clamp ``‖δ_i‖ ≤ clamp · ‖v_0,i‖`` (ROME Eq. 4) and pin finished requests
    (Adam's momentum must not move them)."""
    norms = delta.norm(dim=1)
    scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
    delta.mul_(scale[:, None])
    delta[~active] = frozen[~active]


def _result(delta, v0, k_star, k_plain, nll_final, steps, t0, t1) -> ValueResult:
    if not torch.isfinite(delta).all():
        raise FloatingPointError("value optimisation produced a non-finite vector; lower v_lr")
    return ValueResult(
        v0 + delta.detach(),
        v0,
        k_star,
        k_plain,
        [float(x) for x in nll_final],
        steps,
        {"keys": t1 - t0, "values": time.perf_counter() - t1},
    )


@dataclass
class _Group:
    """One row group of the grouped search: its prompts, their replay and the active view."""

    batch: PromptBatch
    replay: Replay
    kl_rows: torch.Tensor
    view: _ActiveView | None = None


def _paths(handle: ModelHandle, layer: int, where: str, key_layer: int) -> tuple:
    hook_mod = handle.mlp_out(layer) if where == "mlp_out" else handle.block(layer)
    key_path = handle.spec.mlp_out_path(key_layer)
    val_path = handle.spec.mlp_out_path(layer) if where == "mlp_out" else handle.spec.block_path(layer)
    return hook_mod, key_path, val_path


def _one_group(handle: ModelHandle, requests, layer, templates, hp, key_path, val_path):
    """All rows in one group: every template row and the KL rows, aligned and replayed together."""
    n = len(requests)
    batch = build_prompts(handle, requests, templates, align=True)
    replay = Replay(handle, batch, layer, probes=[key_path, val_path], prefix_tree=_prefix_tree(hp))
    plain = (batch.template == 0).nonzero().squeeze(1)  # rows of the bare "{}" template, one per request
    v0 = replay.probe_out[val_path][plain]
    keys_all = replay.probe_in[key_path]
    k_star = mean_over_templates(keys_all, batch, n)
    kl_rows = batch.is_kl.nonzero().squeeze(1)  # one "{} is a" row per request, in request order
    return [_Group(batch, replay, kl_rows)], v0, k_star, keys_all[plain]


def _split_groups(handle: ModelHandle, requests, layer, templates, hp, key_path, val_path, mode, suffix_lens):
    """The rows split into groups that pad little, plus one group for the KL prompts, cut after the
    subject. ``mode="suffix"``: requests bucketed by the length of what follows the subject (prompt
    rest + target, the only columns a step replays; buckets from :func:`suffix_buckets`), each bucket
    with all its template rows; ``"template"``: one group per context template; ``"kl"``: one group
    for all template rows. Each group is aligned and replayed on its own."""
    n = len(requests)
    everyone, all_t = list(range(n)), list(range(len(templates)))
    if mode == "template":
        parts = [(everyone, [t]) for t in all_t]
    elif mode == "suffix":
        lens = suffix_lens or [suffix_len(handle.tokenizer, r) for r in requests]
        parts = [(idx, all_t) for idx in suffix_buckets(lens, len(templates))]
    else:
        parts = [(everyone, all_t)]
    groups: list[_Group] = []
    no_kl = torch.zeros(0, dtype=torch.long)
    v0 = k_plain = k_sum = None
    k_cnt = torch.zeros(n)
    for idx, tids in parts:
        b = build_prompts(
            handle, [requests[i] for i in idx], [templates[t] for t in tids], kl_prompts=(), align=True
        )
        b.owner = torch.tensor(idx)[b.owner]  # request indices of the chunk
        b.template = torch.tensor(tids)[b.template]
        g = _Group(
            b, Replay(handle, b, layer, probes=[key_path, val_path], prefix_tree=_prefix_tree(hp)), no_kl
        )
        groups.append(g)
        k_in, v_out = g.replay.probe_in[key_path], g.replay.probe_out[val_path]
        if v0 is None:
            v0, k_plain = v_out.new_zeros(n, v_out.shape[1]), k_in.new_zeros(n, k_in.shape[1])
            k_sum = k_in.new_zeros(n, k_in.shape[1])
        plain = b.template == 0  # the bare "{}" template
        v0[b.owner[plain]] = v_out[plain]
        k_plain[b.owner[plain]] = k_in[plain]
        k_sum.index_add_(0, b.owner, k_in)
        k_cnt.index_add_(0, b.owner, torch.ones(len(b)))
    k_star = k_sum / k_cnt[:, None]  # k* averaged over the context templates
    kb = build_prompts(handle, requests, [], with_targets=False, align=True)
    kl_group = _Group(kb, Replay(handle, kb, layer, prefix_tree=_prefix_tree(hp)), torch.arange(len(kb)))
    groups.append(kl_group)
    return groups, v0, k_star, k_plain


def _optimize(
    handle: ModelHandle,
    requests,
    layer,
    templates,
    hp,
    where,
    key_layer,
    mode: str = "none",
    suffix_lens=None,
) -> ValueResult:
    """One chunk of requests: build its row groups (``mode="none"``: one group), then :func:`_search`."""
    t0 = time.perf_counter()
    hook_mod, key_path, val_path = _paths(handle, layer, where, key_layer)
    if mode == "none":
        setup = _one_group(handle, requests, layer, templates, hp, key_path, val_path)
    else:
        setup = _split_groups(handle, requests, layer, templates, hp, key_path, val_path, mode, suffix_lens)
    return _search(handle, hp, hook_mod, len(templates), *setup, t0, whole_requests=mode != "template")


def _search(
    handle: ModelHandle,
    hp,
    hook_mod,
    n_prompts,
    groups,
    v0,
    k_star,
    k_plain,
    t0,
    whole_requests: bool = False,
) -> ValueResult:
    """The optimisation (ROME Eq. 4), written once for every grouping: each step runs forward and
    backward group by group (one group's graph in memory at a time), adds the decay term, stops the
    requests whose target NLL fell below ``early_stop_loss``, steps Adam and applies the norm clamp.

    ``whole_requests``: every request's target rows lie in one group (the KL group last), so a
    request's NLL is known right after its group's forward; a request that stops at this step then
    takes no part in the backward (its gradient would be discarded): the same search, and the last
    step of a lone request (ROME) is a forward only.

    The KL term's reference distributions ``p_0`` are the first step's own (δ = 0 there): no separate
    forward of the unedited model."""
    n = len(v0)
    t1 = time.perf_counter()
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr, betas=(getattr(hp, "v_beta1", 0.9), 0.999))
    v0_norm = v0.norm(dim=1)
    max_norm = hp.clamp_norm_factor * v0_norm
    nll_final = torch.full((n,), float("nan"))
    active = torch.ones(n, dtype=torch.bool)
    frozen = torch.zeros_like(v0)
    steps = 0
    kl_ref = None  # log p_0 of every KL row, in request order: taken from the first step
    for step in range(hp.v_steps):
        steps = step + 1
        opt.zero_grad()
        nll_req = torch.zeros(n)
        weight = active.float()
        stopping = torch.zeros(n, dtype=torch.bool)  # requests already known to stop at this step
        for g in groups:
            if not active[g.batch.owner].any():  # a group whose requests have all converged
                continue
            if g.view is None:  # (re)build the forward over the rows of requests still optimising
                g.view = _ActiveView(g.batch, g.replay, active, g.kl_rows)
            v = g.view
            with add_at_positions(hook_mod, delta[v.owner], v.positions), _search_precision(handle, hp):
                logits = v.replay.logits_at(v.read_rows, v.read_cols)
            nt = len(v.tgt_tokens)
            loss = logits.new_zeros(())
            if nt:
                tok_nll = F.cross_entropy(logits[:nt].float(), v.tgt_tokens, reduction="none")
                per_row = torch.zeros(v.n_rows).index_add(0, v.tgt_rows, tok_nll) / v.row_ntok.clamp(min=1)
                part = (
                    torch.zeros(n).index_add(0, v.owner, per_row) / n_prompts
                )  # mean over a request's prompts
                nll_req += part.detach()
                if whole_requests:
                    mine = torch.zeros(n, dtype=torch.bool)
                    mine[v.owner[v.tgt_rows]] = True
                    stopping |= mine & active & (nll_req < hp.early_stop_loss)
                    weight = (active & ~stopping).float()
                loss = loss + (part * weight).sum()
            if len(v.kl_rows):
                kl_new = F.log_softmax(logits[nt:].float(), dim=-1)
                if kl_ref is None:  # the first step: δ = 0, every request's KL row present
                    kl_ref = kl_new.detach()
                kl = (kl_new.exp() * (kl_new - kl_ref[v.kl_index])).sum(-1)  # KL(p_δ ‖ p_0) at the subject
                kl_req = torch.zeros(n).index_add(0, v.owner[v.kl_rows], kl)
                loss = loss + hp.kl_factor * (kl_req * weight).sum()
            if weight[v.owner].any():
                loss.backward()
        if weight.any():
            ((hp.v_weight_decay * delta.norm(dim=1) / v0_norm**2) * weight).sum().backward()
        nll_final[active] = nll_req[active]
        log.debug(
            "value step %d: %d active, NLL median %.3f max %.3f",
            step,
            int(active.sum()),
            float(nll_req[active].median()),
            float(nll_req[active].max()),
        )
        done = active & (nll_req < hp.early_stop_loss)
        if done.any():  # these targets are already likely: freeze their δ and drop their rows
            with torch.no_grad():
                frozen[done] = delta[done]
            active = active & ~done
            for g in groups:
                g.view = None
            if not active.any():
                break
        opt.step()
        _project(delta, max_norm, active, frozen)
    return _result(delta, v0, k_star, k_plain, nll_final, steps, t0, t1)
