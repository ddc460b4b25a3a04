"""One request model for editing (and, later, unlearning): a prompt with ``{}`` for the subject.

``EditRequest`` says "for ``prompt`` with ``subject`` in place of its ``{}`` the model should now answer
``target_new``" (:func:`fill_subject`: a plain substitution, so other braces in a prompt are text).
Readers accept loka's own JSON/JSONL records and CounterFact ``requested_rewrite`` records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RequestError
from .utils.io import read_regular

log = logging.getLogger(__name__)

#: a requests file larger than this is not a requests file
MAX_REQUEST_BYTES = 512 * 1024 * 1024


def fill_subject(prompt: str, subject: str) -> str:
    """``prompt`` with ``subject`` in place of its ``{}`` — the one substitution every method uses (never
    ``str.format``, which would read ``{hello}`` or ``{0}`` in a prompt as fields)."""
    return prompt.replace("{}", subject, 1)


def _clean_target(value: Any, field_name: str, where: str) -> str:
    if isinstance(value, dict) and "str" in value:  # CounterFact {"str": ..., "id": ...}
        value = value["str"]
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{where}: field '{field_name}' must be a non-empty string (got {value!r})")
    return value


@dataclass
class EditRequest:
    """Make the model answer ``target_new`` to ``prompt`` filled with ``subject``.

    ``paraphrases`` are full prompts (subject filled in) that should also give ``target_new``;
    ``neighborhood`` are full prompts about other subjects that should keep their answer
    (``target_true`` when they share it, as in CounterFact).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    neighborhood: list[str] = field(default_factory=list)
    case_id: str | int | None = None
    relation_id: str | None = None

    def __post_init__(self) -> None:
        where = f"request {self.case_id}" if self.case_id is not None else "request"
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            raise RequestError(
                f"{where}: field 'prompt' must contain '{{}}' exactly once where the subject goes, "
                f"e.g. '{{}} is located in the city of' (got {self.prompt!r})"
            )
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise RequestError(f"{where}: field 'subject' must be a non-empty string")
        self.target_new = _clean_target(self.target_new, "target_new", where)
        if self.target_true is not None:
            self.target_true = _clean_target(self.target_true, "target_true", where)
        for name in ("paraphrases", "neighborhood"):
            val = getattr(self, name)
            if val is None:
                val = []
            if not isinstance(val, list | tuple) or not all(isinstance(p, str) for p in val):
                raise RequestError(
                    f"{where}: field '{name}' must be a list of full prompts (strings), got {type(val).__name__} {val!r:.60}"
                )
            setattr(self, name, list(val))
        if (
            type(self) is EditRequest
            and self.target_true is not None
            and self.target_new.strip().lower() == self.target_true.strip().lower()
        ):
            log.warning(
                "%s: target_new %r equals target_true: the edit asks for the answer the model already has",
                where,
                self.target_new,
            )

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return fill_subject(self.prompt, self.subject)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ForgetRequest(EditRequest):
    """Make the model stop answering ``target_true`` to ``prompt`` filled with ``subject``.

    The same request model as editing (KnowledgeSmith: editing and unlearning differ only in the
    target distribution): ``target_true`` is the answer to forget; ``target_new`` is optional and
    names a replacement for methods that learn one (IdK refusals, ReLearn rewrites).
    """

    target_new: str | None = None

    def __post_init__(self) -> None:
        where = f"request {self.case_id}" if self.case_id is not None else "request"
        if self.target_true is None:
            raise RequestError(
                f"{where}: field 'target_true' (the answer to forget) is required for a ForgetRequest"
            )
        self.target_true = _clean_target(self.target_true, "target_true", where)
        keep = self.target_new
        self.target_new = self.target_true if keep is None else keep  # validated like an edit, then restored
        super().__post_init__()
        if keep is None:
            self.target_new = None


@dataclass
class RetainRequest(EditRequest):
    """A fact whose answer ``target_new`` must be kept (the retain set): learning it is the retain loss."""


@dataclass(frozen=True)
class UpdateBatch:
    """The requests of one update, sorted once by what they ask: ``edits`` (learn a new answer),
    ``forget`` (stop giving an answer) and ``retain`` (keep an answer). Iterating gives every request in
    the order given (what the artifact records); methods read the three parts instead of testing types."""

    items: tuple[EditRequest, ...]

    @classmethod
    def of(cls, requests: Sequence[EditRequest] | UpdateBatch) -> UpdateBatch:
        return requests if isinstance(requests, UpdateBatch) else cls(tuple(requests))

    @property
    def forget(self) -> list[ForgetRequest]:
        return [r for r in self.items if isinstance(r, ForgetRequest)]

    @property
    def retain(self) -> list[RetainRequest]:
        return [r for r in self.items if isinstance(r, RetainRequest)]

    @property
    def edits(self) -> list[EditRequest]:
        return [r for r in self.items if not isinstance(r, ForgetRequest | RetainRequest)]

    def tasks(self) -> set[str]:
        """The kinds of request present: a subset of {"edit", "forget", "retain"}."""
        return {
            k for k, part in (("edit", self.edits), ("forget", self.forget), ("retain", self.retain)) if part
        }

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


_FIELDS = {f.name for f in dataclasses.fields(EditRequest)}
_ALIASES = {"target": "target_new", "neighbourhood": "neighborhood", "id": "case_id"}


#: How a TOFU-style question is put to the model (the question fills the ``{}``).
QA_PROMPT = "Question: {}\nAnswer:"


def _qa_record(rec: dict) -> dict:
    """``{question, answer[, paraphrased_question, perturbed_answer, paraphrased_answer]}`` → a request
    record with prompt :data:`QA_PROMPT`, the question as subject and the paraphrased question."""
    out = {"prompt": QA_PROMPT, "subject": rec.pop("question")}
    if "paraphrased_question" in rec:
        out["paraphrases"] = [QA_PROMPT.format(rec.pop("paraphrased_question"))]
    for k in ("perturbed_answer", "paraphrased_answer"):  # evaluation-only fields
        rec.pop(k, None)
    return {**rec, **out}


def request_from_record(
    rec: Any, where: str = "record", kind: type[EditRequest] = EditRequest
) -> EditRequest:
    """Build an :class:`EditRequest` (or ``kind``) from a loka record or a CounterFact record."""
    if not isinstance(rec, dict):
        raise RequestError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if kind is not EditRequest:
        rec = dict(rec)
        if "question" in rec and "prompt" not in rec:  # TOFU-style QA: the question is the subject
            rec = _qa_record(rec)
        if "answer" in rec:
            rec["target_true" if kind is ForgetRequest else "target_new"] = rec.pop("answer")
        if kind is ForgetRequest and "target_true" not in rec and "target" in rec:
            rec["target_true"] = rec.pop("target")
        if kind is ForgetRequest and "requested_rewrite" in rec:  # forget the CounterFact true object
            base = request_from_record(rec, where)
            return ForgetRequest(
                base.prompt,
                base.subject,
                None,
                base.target_true,
                base.paraphrases,
                base.neighborhood,
                base.case_id,
                base.relation_id,
            )
    if "requested_rewrite" in rec:  # CounterFact / multi-CounterFact
        rw = rec["requested_rewrite"]
        if isinstance(rw, list):  # MQuAKE-style list of rewrites: take them one by one elsewhere
            raise RequestError(f"{where}: 'requested_rewrite' is a list; use read_requests to expand it")
        if not isinstance(rw, dict):
            raise RequestError(
                f"{where}: 'requested_rewrite' must be an object with prompt, subject and target_new, got {rw!r:.60}"
            )
        missing = [k for k in ("prompt", "subject", "target_new") if k not in rw]
        if missing:
            raise RequestError(f"{where}: requested_rewrite lacks field(s) {missing}")
        return EditRequest(
            prompt=rw["prompt"],
            subject=rw["subject"],
            target_new=rw["target_new"],
            target_true=rw.get("target_true"),
            paraphrases=rec.get("paraphrase_prompts", []),
            neighborhood=rec.get("neighborhood_prompts", []),
            case_id=rec.get("case_id", where),
            relation_id=rw.get("relation_id"),
        )
    data = {_ALIASES.get(k, k): v for k, v in rec.items()}
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise RequestError(
            f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)} (or a CounterFact record with "
            "'requested_rewrite')"
        )
    data.setdefault("case_id", where)
    if kind is EditRequest:
        missing = [k for k in ("prompt", "subject", "target_new") if k not in data]
    else:
        missing = [
            k
            for k in ("prompt", "subject", "target_true" if kind is ForgetRequest else "target_new")
            if k not in data
        ]
    if missing:
        hint = ""
        if kind is EditRequest and missing == ["target_new"] and "target_true" in data:
            hint = (
                " (a record with only target_true is a fact to forget: read it with "
                "read_requests(path, loka.ForgetRequest), or pass it to loka unlearn --forget)"
            )
        raise RequestError(f"{where}: missing field(s) {missing}{hint}")
    return kind(**data)


def read_requests(path: str | Path, kind: type[EditRequest] = EditRequest) -> list[EditRequest]:
    """Read requests from a JSON list, a single JSON object, or JSON lines.

    ``kind`` is :class:`EditRequest`, :class:`ForgetRequest` (a record's ``target_true``, or
    ``target``/``answer``, is the answer to forget) or :class:`RetainRequest` (its ``target_new``,
    ``target`` or ``answer`` is kept)."""
    path = Path(path)
    if not path.exists():
        raise RequestError(f"requests file {path} does not exist")
    try:
        text = read_regular(path, MAX_REQUEST_BYTES).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    records: list[tuple[str, Any]]
    stripped = text.lstrip()
    try:
        obj = json.loads(text)
        records = (
            [(f"{path.name}[{i}]", r) for i, r in enumerate(obj)]
            if isinstance(obj, list)
            else [(path.name, obj)]
        )
    except RecursionError:
        raise RequestError(f"{path}: JSON nested too deeply to be requests") from None
    except json.JSONDecodeError:
        if stripped.startswith("["):
            raise RequestError(f"{path}: not valid JSON") from None
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path.name}:{n}", json.loads(line)))
            except RecursionError:
                raise RequestError(f"{path}:{n}: JSON nested too deeply to be a request") from None
            except json.JSONDecodeError as e:
                raise RequestError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
    if not records:
        raise RequestError(f"{path}: no records")
    return [request_from_record(r, where, kind) for where, r in records]


def subject_last_token(tokenizer, text_template: str, subject: str) -> int:
    """Index of the last token of ``subject`` in ``text_template.replace('{}', subject)``.

    Tokenises the prefix up to the end of the subject (ROME's ``subject_last`` rule) and checks that
    the full prompt's tokens up to there really end with the subject; otherwise the subject is
    merged with the text around it and is not a token span.
    """
    idx = text_template.find("{}")
    if idx < 0:
        raise RequestError(f"prompt {text_template!r} has no '{{}}' for the subject")
    full = text_template.replace("{}", subject)
    prefix = text_template[:idx] + subject
    full_ids = tokenizer(full)["input_ids"]
    n = len(tokenizer(prefix)["input_ids"])
    covered = (
        tokenizer.decode(full_ids[:n], skip_special_tokens=True) if 0 < n <= len(full_ids) else ""
    ).rstrip()
    end = covered.rfind(subject.rstrip())
    overflow = covered[end + len(subject.rstrip()) :] if end >= 0 else ""
    # the subject's last token may swallow following punctuation ("Section)'s" -> ")'"), not letters
    if end < 0 or (overflow and overflow[0].isalnum()):
        raise RequestError(
            f"subject {subject!r} was not found as a token span in the tokenised prompt {full!r} (the tokens "
            f"there spell {covered!r}); check the spelling, and that '{{}}' is not inside a word"
        )
    return n - 1
