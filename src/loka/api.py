"""The top-level API: ``edit`` turns requests into an artifact, applied to the model by default."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .artifact import Artifact
from .errors import LokaError, RequestError
from .methods import default_hparams, get_method, methods_for
from .methods.base import HParams, check_update
from .methods.prune import check_alpha, prune_deltas
from .requests import EditRequest, UpdateBatch, subject_last_token
from .result import EditResult, measure
from .state import EditState
from .utils.progress import bar as progress_bar

if TYPE_CHECKING:
    from .models.loader import ModelHandle

log = logging.getLogger(__name__)


#: positions kept free for the context prefixes ROME/MEMIT put before a prompt ("<text>. {}")
CONTEXT_ROOM = 32


def validate_requests(handle: ModelHandle, requests: Sequence[EditRequest]) -> None:
    """Check every request against the model's tokenizer: the subject is a token span, the target is
    non-empty, and every prompt with its target fits the model's positions."""
    if not requests:
        raise RequestError("no requests given")
    tok = handle.tokenizer
    limit = handle.max_positions
    for r in requests:
        if not isinstance(r, EditRequest):
            raise RequestError(f"expected EditRequest, got {type(r).__name__}")
        subject_last_token(tok, r.prompt, r.subject)
        if limit is None:
            continue
        answer = max(
            (
                len(tok(" " + t.strip(), add_special_tokens=False)["input_ids"])
                for t in (r.target_new, r.target_true)
                if t
            ),
            default=0,
        )
        for what, text in (
            ("prompt", r.text),
            *(("paraphrase", p) for p in r.paraphrases),
            *(("neighbourhood prompt", p) for p in r.neighborhood),
        ):
            n = len(tok(text)["input_ids"]) + answer
            if n + CONTEXT_ROOM > limit:
                where = f"request {r.case_id}" if r.case_id is not None else "request"
                raise RequestError(
                    f"{where}: the {what} with its answer is {n} tokens; {handle.name} has {limit} positions "
                    f"({CONTEXT_ROOM} kept for context prefixes): shorten it"
                )


def check_result(handle: ModelHandle, art: Artifact) -> None:
    """Refuse an artifact with non-finite or exploded tensors (:func:`loka.methods.base.check_update`):
    every tensor is checked, and each weight update (deltas, merged adapters) against its weight."""
    fix = f"lower lr (or the step size, or clamp_norm_factor) in the {art.method} hyperparameters"
    check_update(art.method, art.deltas, fix=fix)
    merged = art.weight_deltas()
    if merged:
        weights = {}
        for n in merged:
            try:
                weights[n] = handle.model.get_parameter(n)
            except AttributeError:
                continue
        check_update(art.method, merged, weights, fix=fix)


def _reported(
    handle: ModelHandle, batch: UpdateBatch, run: Callable[[], Artifact], *, apply: bool, by_set: bool
) -> EditResult:
    """Measure ``batch`` (:func:`loka.result.measure`), ``run`` the update, measure again (with the
    artifact applied for the measurement only when ``apply`` is false)."""
    validate_requests(handle, list(batch))  # before probing: a bad request fails as it would unreported
    before = measure(handle, batch, by_set)
    t0 = time.time()
    art = run()
    seconds = time.time() - t0
    if not apply:
        art.apply(handle)
    try:
        after = measure(handle, batch, by_set)
    finally:
        if not apply:
            art.revert(handle)
    return EditResult(art, list(batch), before, after, round(seconds, 3))


def edit(
    handle: ModelHandle,
    requests: EditRequest | Sequence[EditRequest],
    method: str = "rome",
    hparams: HParams | dict | None = None,
    *,
    apply: bool = True,
    progress: bool = True,
    state: EditState | None = None,
    prune: float | None = None,
    report: bool = False,
) -> Artifact | EditResult:
    """Run ``method`` on ``requests`` and return the artifact (applied to ``handle`` unless ``apply=False``).

    The model's weights are untouched if the method fails; hyperparameters default to the
    per-model config file (``loka/configs/<method>/<model>.json``), with ``hparams`` overriding.
    ``state`` carries what sequential methods need from earlier batches (AlphaEdit's past keys,
    PRUNE's accumulated update) and is updated in place; ``prune`` (a log base α > 1, e.g. ``math.e``)
    restrains the accumulated update's singular values with PRUNE after the method ran.

    ``report=True`` returns an :class:`~loka.result.EditResult` instead: the artifact and the rows
    ``loka edit`` prints, measured before and after (``print(result)`` prints its table); with forget
    or retain requests, the per-set rows of ``loka update``.
    """
    if isinstance(requests, EditRequest):
        requests = [requests]
    requests = UpdateBatch.of(requests)
    if report:
        return _reported(
            handle,
            requests,
            lambda: edit(
                handle, requests, method, hparams, apply=apply, progress=progress, state=state, prune=prune
            ),
            apply=apply,
            by_set=bool(requests.forget or requests.retain),
        )
    validate_requests(handle, list(requests))
    m = get_method(method)
    if requests.forget and "forget" not in m.tasks:
        raise RequestError(
            f"{method} edits; it cannot forget: use a method that forgets ({', '.join(methods_for('forget'))}), "
            "or loka.update, which edits with this one and forgets with another"
        )
    if prune is not None:
        check_alpha(prune)  # before the method runs, not after
    if isinstance(hparams, HParams):
        hp = hparams
    else:
        hp = default_hparams(method, handle, hparams or {})
    t0 = time.time()
    bar = progress_bar(total=len(requests), desc=f"{method} edits", unit="req", disable=not progress)
    work = state.copy() if state is not None else EditState()  # committed only on success
    try:
        deltas, info = m.run(handle, requests, hp, progress=bar, state=work)
        if prune is not None:
            if m.kind != "weight-delta":
                raise LokaError(f"--prune restrains weight updates; {method} changes no weights")
            deltas, info["prune"] = prune_deltas(handle, deltas, work, prune)
            info["prune_alpha"] = prune
    finally:
        bar.close()
    seconds = time.time() - t0
    art = Artifact.create(
        deltas,
        method=method,
        hparams=hp.to_dict(),
        requests=[r.to_dict() for r in requests],
        handle=handle,
        extra={"seconds": round(seconds, 3), **info},
        kind=m.kind,
    )
    check_result(handle, art)  # a diverged or exploded update is refused before it is applied or counted
    if state is not None:
        work.meta["batches"] = work.batches + 1
        state.tensors, state.meta = work.tensors, work.meta
    log.debug("%s: %d request(s) in %.1fs -> artifact %s", method, len(requests), seconds, art.id)
    if apply:
        art.apply(handle)
    return art


def unlearn(
    handle: ModelHandle,
    forget,
    retain=(),
    method: str = "npo",
    hparams: HParams | dict | None = None,
    *,
    apply: bool = True,
    progress: bool = True,
    report: bool = False,
) -> Artifact | EditResult:
    """Forget ``forget`` (:class:`~loka.requests.ForgetRequest`) while keeping ``retain``
    (:class:`~loka.requests.RetainRequest`); returns the artifact, applied unless ``apply=False``.

    ``report=True`` returns an :class:`~loka.result.EditResult` whose rows are the answers' ``p_norm``
    and ``em`` per request before and after, and whose table is what ``loka unlearn`` prints."""
    from .requests import ForgetRequest, RetainRequest

    forget, retain = list(forget), list(retain)
    if not forget:
        raise RequestError("no forget requests given")
    if not all(isinstance(r, ForgetRequest) for r in forget):
        raise RequestError(
            "forget requests must be ForgetRequest (read them with read_requests(path, ForgetRequest))"
        )
    if not all(isinstance(r, RetainRequest) for r in retain):
        raise RequestError(
            "retain requests must be RetainRequest (read them with read_requests(path, RetainRequest))"
        )
    return edit(
        handle,
        UpdateBatch((*forget, *retain)),
        method,
        hparams,
        apply=apply,
        progress=progress,
        report=report,
    )


def update(
    handle: ModelHandle,
    edits=(),
    forget=(),
    retain=(),
    method: str = "npo",
    hparams: HParams | dict | None = None,
    *,
    forget_method: str = "npo",
    apply: bool = True,
    progress: bool = True,
    state: EditState | None = None,
    report: bool = False,
) -> Artifact | EditResult:
    """Joint update: learn ``edits``, forget ``forget``, keep ``retain``.

    A training method does all three in one optimisation. A single-task method (ROME, MEMIT, …)
    edits first; then ``forget_method`` forgets on top of the edited model with the same retain set.
    Returns one (stacked) artifact, applied unless ``apply=False``, whose ``steps`` list says what ran
    (also logged). ``state`` continues a sequential LOKA codebook
    (:func:`loka.methods.codebook.state_from_artifact`). ``report=True`` returns an
    :class:`~loka.result.EditResult` with the per-set rows and table ``loka update`` prints.
    """
    edits, forget, retain = list(edits), list(forget), list(retain)
    if report:
        batch = UpdateBatch((*edits, *forget, *retain))
        if not batch.items:
            raise RequestError("nothing to do: give edit and/or forget requests")
        return _reported(
            handle,
            batch,
            lambda: update(
                handle,
                edits,
                forget,
                retain,
                method,
                hparams,
                forget_method=forget_method,
                apply=apply,
                progress=progress,
                state=state,
            ),
            apply=apply,
            by_set=True,
        )
    art = _update(handle, edits, forget, retain, method, hparams, forget_method, apply, progress, state)
    for line in art.steps:
        log.info("update: %s", line)
    return art


def _update(
    handle: ModelHandle,
    edits: list[EditRequest],
    forget: list,
    retain: list,
    method: str,
    hparams: HParams | dict | None,
    forget_method: str,
    apply: bool,
    progress: bool,
    state: EditState | None,
) -> Artifact:
    from .artifact import bundle_artifacts, stack_artifacts

    if "forget" in get_method(method).tasks:  # a method that forgets does everything in one optimisation
        art = edit(
            handle,
            UpdateBatch((*edits, *forget, *retain)),
            method,
            hparams,
            apply=apply,
            progress=progress,
            state=state,
        )
        art.steps = [
            f"{method}: {len(edits)} edit(s), {len(forget)} forget, {len(retain)} retain in one optimisation"
        ]
        return art
    if not edits and not forget:
        raise RequestError("nothing to do: give edit and/or forget requests")
    steps, arts = [], []
    try:  # each step runs on the model the previous one left
        if edits:
            arts.append(edit(handle, edits, method, hparams, apply=True, progress=progress))
            steps.append(f"{method} is single-task: edited {len(edits)} fact(s) first")
        if forget:
            arts.append(unlearn(handle, forget, retain, forget_method, apply=True, progress=progress))
            steps.append(
                f"then {forget_method} forgot {len(forget)} fact(s) (retain {len(retain)}) on the edited model"
            )
    finally:  # leave the model as it was; the result is applied below as one artifact
        for a in reversed(arts):
            a.revert(handle)
    if len(arts) == 1:
        art = arts[0]
    elif all(a.kind in ("weight-delta", "adapter") for a in arts):
        art = stack_artifacts(arts)
    else:  # a memory or context artifact cannot be summed into weights: keep both, applied in order
        art = bundle_artifacts(arts)
    art.steps = steps
    if apply:
        art.apply(handle)
    return art
