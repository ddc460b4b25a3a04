"""The server's model: one loaded model, one lock, and the artifacts applied to it.

Every request that uses the model takes :attr:`Engine.lock`, switches the model to the stack it must
see — the global stack (``POST /v1/artifacts/{id}/apply``) followed by the request's own
``"artifacts"`` — and holds the lock until its answer is complete. A switch costs the fewest apply and
revert operations: the applied artifacts that differ from the wanted stack are reverted from the top
(each revert restores the weights bit for bit), then the missing ones applied, so requests that share
a stack switch nothing and a request never sees another's stack. Requests are served one at a time;
the model is left as the last request had it, and the next one switches.

Generation is loka's own greedy (or sampled) loop over the KV cache, token by token, so that a
stream can send each piece as it is made and stop strings and a client that went away end the loop
early; greedy output equals :func:`loka.scoring.generate` (tested). Artifacts that act through hooks
(GRACE, WISE, MEMOIR, LOKA's codebook) and context stores (SCR) are honoured as there: prompts are
rewritten by the applied context stores and run under the router's choice.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..artifact import Artifact
from ..errors import ArtifactError, LokaError, ModelError, RequestError
from ..hf_compat import cache_out, with_cache
from ..requests import EditRequest, ForgetRequest, RetainRequest, request_from_record
from ..runtime import rewrite_prompts, route_groups
from ..scoring import target_logprobs
from ..utils.io import read_text
from .store import ArtifactStore, ConflictError

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]
#: most artifacts one request may stack on top of the global stack
MAX_REQUEST_STACK = 32
#: tokens of the generations in a probe row and in an artifact's report
PROBE_TOKENS = 12


@dataclass
class GenParams:
    """How to continue a prompt: ``temperature`` 0 is greedy; above 0, sampling with ``top_p`` nucleus
    and a ``seed`` (random when ``None``); generation ends at the model's end-of-sequence token, at any
    of ``stop`` (left out of the text) or after ``max_tokens``."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Generation:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def _holdback(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (kept back from a stream)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _eos_ids(handle: ModelHandle) -> set[int]:
    eos = getattr(getattr(handle.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = handle.tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def _pick(logits: torch.Tensor, p: GenParams, gen: torch.Generator | None) -> int:
    """The next token: the argmax (greedy), or a sample at ``temperature`` from the ``top_p`` nucleus."""
    if p.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = (sp.cumsum(0) - sp) < p.top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, si, sp * keep)
    return int(torch.multinomial(probs, 1, generator=gen))


def chat_template(handle: ModelHandle) -> str | None:
    """The tokenizer's chat template, else the ``chat_template.jinja`` of the model's folder (a cached
    conversion keeps it there), else ``None``."""
    tpl = getattr(handle.tokenizer, "chat_template", None)
    if tpl:
        return tpl
    path = Path(handle.source) / "chat_template.jinja"
    if path.is_file():
        try:
            return read_text(path, 1 << 20)
        except LokaError:
            return None
    return None


def chat_prompt(handle: ModelHandle, messages: Sequence[dict[str, str]]) -> tuple[str, bool]:
    """The text the model continues for ``messages`` and whether the tokenizer adds its special tokens:
    the chat template when the model has one, else ``role: content`` lines ending ``assistant:``."""
    tpl = chat_template(handle)
    if tpl:
        try:
            text = handle.tokenizer.apply_chat_template(
                list(messages), chat_template=tpl, tokenize=False, add_generation_prompt=True
            )
            return str(text), False
        except Exception as e:  # a template that refuses these roles: say so in one line
            raise RequestError(f"messages: the model's chat template refused them ({e})") from None
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"]), True


class Engine:
    """One model, its lock, the global artifact stack and the store the artifacts come from."""

    def __init__(
        self,
        handle: ModelHandle,
        store: ArtifactStore,
        *,
        max_tokens_limit: int = 512,
        device: str | None = None,
    ):
        self.handle = handle
        self.store = store
        self.max_tokens_limit = max_tokens_limit
        self.device = device
        self.lock = threading.Lock()
        self._global: list[
            Artifact
        ] = []  # the global stack, held here (a folder removed by hand stays served)
        self._applied: list[Artifact] = []  # what is applied to the model now, in order

    # -- stacks ---------------------------------------------------------------------------------------
    @property
    def stack(self) -> list[str]:
        """The global stack: ids applied for every request, in order."""
        return [a.id for a in self._global]

    @property
    def applied_now(self) -> list[str]:
        """What the model has applied at this moment (the last request's stack)."""
        return [a.id for a in self._applied]

    def _check_model(self, art: Artifact) -> None:
        want = (art.manifest.get("model") or {}).get("hash")
        if want and want != self.handle.model_hash:
            made = (art.manifest.get("model") or {}).get("name")
            raise ConflictError(
                f"artifact {art.id} was made for {made} (hash {want[:12]}), the server has {self.handle.name} "
                f"loaded (hash {self.handle.model_hash[:12]}): load that model first (POST /v1/models/load)"
            )

    def resolve(self, ids: Sequence[str] | None, param: str = "artifacts") -> list[Artifact]:
        """The artifacts of a request's stack, from the store: each id once, made for this model."""
        ids = list(ids or [])
        if len(ids) > MAX_REQUEST_STACK:
            raise RequestError(f"{param}: at most {MAX_REQUEST_STACK} artifacts per request, got {len(ids)}")
        dup = next((i for n, i in enumerate(ids) if i in ids[:n]), None)
        if dup is not None:
            raise RequestError(
                f"{param}: artifact {dup} is listed twice; an update applied twice counts twice"
            )
        arts = [self.store.get(i) for i in ids]
        for a in arts:
            self._check_model(a)
        return arts

    def _switch(self, target: list[Artifact]) -> None:
        """Make the applied artifacts exactly ``target`` (the caller holds the lock)."""
        n = 0
        while n < min(len(target), len(self._applied)) and target[n].id == self._applied[n].id:
            n += 1
        while len(self._applied) > n:
            self._applied[-1].revert(self.handle)
            self._applied.pop()
        for a in target[n:]:
            try:
                a.apply(self.handle)
            except ArtifactError as e:
                raise ConflictError(str(e)) from None
            self._applied.append(a)

    @contextlib.contextmanager
    def using(self, ids: Sequence[str] | None = None) -> Iterator[list[str]]:
        """Hold the model with the global stack and then ``ids`` applied; yields the effective stack."""
        extra = self.resolve(ids)
        with self.lock:
            target = list(self._global)
            target += [a for a in extra if a.id not in self.stack]
            self._switch(target)
            yield [a.id for a in target]

    def apply_global(self, art_id: str) -> list[str]:
        """Add ``art_id`` to the global stack (applied at once, so that a clash is refused now)."""
        [art] = self.resolve([art_id], "id")
        with self.lock:
            if art_id in self.stack:
                raise ConflictError(
                    f"artifact {art_id} is already applied (the global stack is {self.stack})"
                )
            self._switch([*self._global, art])
            self._global.append(art)
            return self.stack

    def revert_global(self, art_id: str) -> list[str]:
        """Take ``art_id`` off the global stack; the ones above it stay, in order."""
        with self.lock:
            if art_id not in self.stack:
                self.store.entry(art_id)  # an unknown id is a 404, a known one not applied a 409
                raise ConflictError(f"artifact {art_id} is not applied (the global stack is {self.stack})")
            rest = [a for a in self._global if a.id != art_id]
            self._switch(rest)
            self._global = rest
            return self.stack

    def delete(self, art_id: str) -> None:
        """Remove ``art_id`` from the store; refused while it is on the global stack."""
        self.store.entry(art_id)
        with self.lock:
            if art_id in self.stack:
                raise ConflictError(
                    f"artifact {art_id} is applied; revert it first (POST /v1/artifacts/{art_id}/revert)"
                )
            if art_id in self.applied_now:  # left applied by the last request
                self._switch(list(self._global))
            self.store.remove(art_id)

    def load_model(self, name: str) -> None:
        """Replace the model with ``name`` (the global stack is reverted and cleared first)."""
        from ..models import load_model

        with self.lock:
            handle = load_model(name, device=self.device)
            self._switch([])
            self._global = []
            self.handle = handle

    # -- generation -----------------------------------------------------------------------------------
    def check_max_tokens(self, max_tokens: int) -> None:
        if max_tokens < 1 or max_tokens > self.max_tokens_limit:
            raise RequestError(
                f"max_tokens: must be 1..{self.max_tokens_limit} (the server's --max-tokens-limit), got {max_tokens}"
            )

    def check_prompt(self, text: str, max_tokens: int, special: bool = True) -> int:
        """The prompt's token count, after checking it and ``max_tokens`` fit the model's positions (the
        caller holds the lock)."""
        self.check_max_tokens(max_tokens)
        n = len(self.handle.tokenizer(text, add_special_tokens=special)["input_ids"])
        if n == 0:
            raise RequestError("prompt: empty; give some text to continue")
        limit = self.handle.max_positions
        if limit is not None and n + max_tokens > limit:
            raise RequestError(
                f"prompt: {n} tokens plus max_tokens {max_tokens} exceed the {limit} positions of "
                f"{self.handle.name}; shorten the prompt or lower max_tokens"
            )
        return n

    @torch.no_grad()
    def _tokens(
        self, text: str, p: GenParams, special: bool, cancel: threading.Event | None
    ) -> Iterator[int]:
        """The generated token ids, one at a time (the caller holds the lock and has switched)."""
        h, model = self.handle, self.handle.model
        [text] = rewrite_prompts(h, [text])
        enc = h.tokenizer(text, return_tensors="pt", add_special_tokens=special)
        ids = enc["input_ids"].to(h.device)
        mask = enc["attention_mask"].to(h.device)
        if h.max_positions is not None and ids.shape[1] + p.max_tokens > h.max_positions:
            raise RequestError(
                f"prompt: with the applied context it has {ids.shape[1]} tokens; plus max_tokens {p.max_tokens} "
                f"that exceeds the {h.max_positions} positions of {h.name}"
            )
        gen = None
        if p.temperature > 0:
            gen = torch.Generator(device=h.device)
            gen.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        [(select, _)] = route_groups(h, [text])
        with select():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            for step in range(p.max_tokens):
                nxt = _pick(out.logits[0, -1], p, gen)
                yield nxt
                if step + 1 == p.max_tokens or (cancel is not None and cancel.is_set()):
                    return
                mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
                cache = cache_out(out)
                out = model(
                    input_ids=torch.tensor([[nxt]], device=h.device),
                    attention_mask=mask,
                    use_cache=True,
                    logits_to_keep=1,
                    **with_cache(model, cache),
                )

    def generate(
        self,
        text: str,
        p: GenParams,
        *,
        special: bool = True,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Continue ``text`` (the caller holds the lock and has switched). ``on_text`` receives the text
        piece by piece: pieces that could start a stop string or end inside a multi-byte character are
        held back, so the pieces add up to the returned text."""
        tok = self.handle.tokenizer
        eos = _eos_ids(self.handle)
        n_prompt = len(tok(text, add_special_tokens=special)["input_ids"])
        out_ids: list[int] = []
        sent = 0
        cut: str | None = None  # the text up to a stop string, once one appeared
        reason: FinishReason = "length"
        for t in self._tokens(text, p, special, cancel):
            out_ids.append(t)
            if t in eos:
                reason = "stop"
                break
            full = tok.decode(out_ids, skip_special_tokens=True)
            hit = [i for i in (full.find(s) for s in p.stop) if i >= 0]
            if hit:
                cut, reason = full[: min(hit)], "stop"
                break
            if on_text is not None and not full.endswith("\ufffd"):
                upto = len(full) - _holdback(full, p.stop)
                if upto > sent:
                    on_text(full[sent:upto])
                    sent = upto
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
        full = cut if cut is not None else tok.decode(out_ids, skip_special_tokens=True)
        if on_text is not None and len(full) > sent:
            on_text(full[sent:])
        return Generation(full, reason, n_prompt, len(out_ids))

    def complete(
        self,
        prompts: Sequence[str],
        p: GenParams,
        artifacts: Sequence[str] | None = None,
        special: bool = True,
    ) -> tuple[list[str], list[Generation]]:
        """Continue every prompt under the global stack plus ``artifacts``: (effective stack, generations)."""
        self.check_max_tokens(p.max_tokens)
        with self.using(
            artifacts
        ) as eff:  # prompts are tokenised under the lock: a method run may be using the tokenizer
            for t in prompts:
                self.check_prompt(t, p.max_tokens, special)
            return eff, [self.generate(t, p, special=special) for t in prompts]

    def stream(
        self,
        prompts: Sequence[str],
        p: GenParams,
        artifacts: Sequence[str] | None,
        emit: Callable[[dict[str, Any]], None],
        cancel: threading.Event,
        special: bool = True,
    ) -> None:
        """What :meth:`complete` does, as events passed to ``emit``: ``start`` (the effective stack), ``text``
        (a piece of prompt ``index``'s continuation), ``end`` (its finish reason and token counts)."""
        self.check_max_tokens(p.max_tokens)
        with self.using(artifacts) as eff:
            for t in prompts:
                self.check_prompt(t, p.max_tokens, special)
            if cancel.is_set():  # the client went away while it waited for the model
                return
            emit({"type": "start", "artifacts": eff})
            for i, t in enumerate(prompts):
                g = self.generate(
                    t,
                    p,
                    special=special,
                    cancel=cancel,
                    on_text=lambda s, i=i: emit({"type": "text", "index": i, "text": s}),
                )
                emit({"type": "end", "index": i, "generation": g})
                if cancel.is_set():
                    return

    # -- probing ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _top(self, prompt: str, k: int = 5) -> list[dict[str, Any]]:
        """The ``k`` likeliest next tokens after ``prompt`` and their probabilities."""
        h = self.handle
        [text] = rewrite_prompts(h, [prompt])
        enc = h.tokenizer(text, return_tensors="pt").to(h.device)
        [(select, _)] = route_groups(h, [text])
        with select():
            logits = h.model(**enc, logits_to_keep=1).logits[0, -1].float()
        probs = torch.softmax(logits, dim=-1)
        top = probs.topk(min(k, probs.numel()))
        return [
            {"token": h.tokenizer.decode([int(i)]), "p": round(float(v), 6)}
            for v, i in zip(top.values, top.indices)
        ]

    def probe_rows(
        self, prompts: Sequence[str], targets: Sequence[str | None], max_tokens: int = PROBE_TOKENS
    ) -> list[dict[str, Any]]:
        """Per prompt: its greedy continuation, top-5 next tokens and P(target) (the caller holds the lock)."""
        scored = [i for i, t in enumerate(targets) if t]
        probs = (
            target_logprobs(self.handle, [prompts[i] for i in scored], [targets[i] for i in scored])
            if scored
            else []
        )
        p_of = {i: r["prob"] for i, r in zip(scored, probs)}
        rows = []
        for i, prompt in enumerate(prompts):
            g = self.generate(prompt, GenParams(max_tokens=max_tokens))
            rows.append(
                {"prompt": prompt, "generation": g.text, "top": self._top(prompt), "p_target": p_of.get(i)}
            )
        return rows

    def probe(
        self,
        prompts: Sequence[str],
        targets: Sequence[str | None] | None,
        max_tokens: int,
        artifacts: Sequence[str] | None,
    ) -> tuple[list[str], list[dict[str, Any]]]:
        targets = list(targets) if targets is not None else [None] * len(prompts)
        if len(targets) != len(prompts):
            raise RequestError(
                f"targets: {len(targets)} given for {len(prompts)} prompts; give one per prompt or null"
            )
        self.check_max_tokens(max_tokens)
        with self.using(artifacts) as eff:
            for t in prompts:
                self.check_prompt(t, max_tokens)
            return eff, self.probe_rows(prompts, targets, max_tokens)

    # -- making artifacts -------------------------------------------------------------------------------
    def create(
        self,
        method: str | None,
        edit: Sequence[dict],
        forget: Sequence[dict],
        retain: Sequence[dict],
        hparams: dict | None,
        *,
        forget_method: str = "npo",
        apply: bool = False,
    ) -> tuple[Artifact, list[dict[str, Any]], float]:
        """Run an update on the model as served (the global stack applied), save its artifact in the store
        and measure each request's prompts before and after. Holds the lock for the whole run."""
        from .. import api
        from ..methods import get_method

        reqs = (
            [_request(r, f"edit[{i}]", EditRequest) for i, r in enumerate(edit)],
            [_request(r, f"forget[{i}]", ForgetRequest) for i, r in enumerate(forget)],
            [_request(r, f"retain[{i}]", RetainRequest) for i, r in enumerate(retain)],
        )
        edits, forgets, retains = reqs
        if not edits and not forgets:
            raise RequestError("edit, forget: nothing to do; give edit and/or forget requests")
        method = method or ("rome" if not forgets and not retains else "npo")
        get_method(method)  # an unknown method is refused before the lock is taken
        rows = _report_rows(edits, forgets, retains)
        with self.lock:
            self._switch(list(self._global))
            api.validate_requests(self.handle, [*edits, *forgets, *retains])
            before = self.probe_rows([r["prompt"] for r in rows], [r["target"] for r in rows])
            t0 = time.time()
            if not forgets and not retains:
                art = api.edit(self.handle, edits, method, hparams, apply=False, progress=False)
            else:
                art = api.update(
                    self.handle,
                    edits,
                    forgets,
                    retains,
                    method,
                    hparams,
                    forget_method=forget_method,
                    apply=False,
                    progress=False,
                )
            seconds = round(time.time() - t0, 3)
            self._check_model(art)
            art.apply(self.handle)
            self._applied.append(art)
            try:
                after = self.probe_rows([r["prompt"] for r in rows], [r["target"] for r in rows])
            finally:
                self._applied.pop().revert(self.handle)
            report = [{**r, "before": _strip(b), "after": _strip(a)} for r, b, a in zip(rows, before, after)]
            sets = _sets_of(art, edits, forgets, retains)
            self.store.add(art, {"sets": sets, "report": report, "seconds": seconds, "steps": art.steps})
            if apply:
                self._switch([*self._global, art])
                self._global.append(art)
        return art, report, seconds


def _strip(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "prompt"}


def _sets_of(art: Artifact, edits, forgets, retains) -> list[str]:
    """Which set each request of the artifact's manifest came from (matched by content, in order)."""
    pool = [("edit", r.to_dict()) for r in edits] + [("forget", r.to_dict()) for r in forgets]
    pool += [("retain", r.to_dict()) for r in retains]
    out = []
    for rec in art.manifest.get("requests", []):
        k = next((n for n, (_, d) in enumerate(pool) if d == rec), None)
        out.append(pool.pop(k)[0] if k is not None else "edit")
    return out


_NEIGHBOURS = ("neighbors", "neighbours", "neighborhood", "neighbourhood")


def _request(rec: Any, where: str, kind: type[EditRequest]) -> EditRequest:
    """A request from a JSON record of the API (loka's fields; ``neighbors`` is the neighbourhood)."""
    if isinstance(rec, dict):
        rec = dict(rec)
        found = [k for k in _NEIGHBOURS if k in rec]
        if len(found) > 1:
            raise RequestError(f"{where}: give the neighbourhood prompts once (got {', '.join(found)})")
        if found:
            rec["neighborhood"] = rec.pop(found[0])
    return request_from_record(rec, where, kind)


def _report_rows(edits, forgets, retains) -> list[dict[str, Any]]:
    """The prompts an artifact's report measures: each request's prompt, paraphrases and neighbours, with
    the answer scored (the new one for edits and retains, the forgotten one for forgets)."""
    rows = []
    for name, reqs in (("edit", edits), ("forget", forgets), ("retain", retains)):
        for i, r in enumerate(reqs):
            target = r.target_true if name == "forget" else r.target_new
            kinds = [("prompt", r.text)] + [("paraphrase", p) for p in r.paraphrases]
            kinds += [("neighbour", p) for p in r.neighborhood]
            rows += [{"set": name, "request": i, "kind": k, "prompt": p, "target": target} for k, p in kinds]
    return rows


def check_model_name(name: str, loaded: str) -> str:
    """``name`` if the server may load it: a catalogue name (``GET /v1/catalog``) or the model it started
    with; a client never makes the server read an arbitrary folder."""
    from ..models import list_models

    names = [m["name"] for m in list_models()]
    if name not in names and name != loaded:
        raise ModelError(f"model: {name!r} is not in the catalogue; give one of {', '.join(names)}")
    return name
