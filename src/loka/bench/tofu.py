"""mini-TOFU: the TOFU questions we have, made into a fine-tune-then-unlearn benchmark offline.

TOFU (Maini et al. 2024) fine-tunes a model on question/answer pairs about fictitious authors, then
unlearns a forget split and compares the result with a model that never saw it. The full data is not
downloadable here; ``loka/data/tofu`` holds forget01 (40), forget05 (200), forget10 (300 of its 400) and
300 retain questions, without paraphrased or perturbed answers. This module supplies what is missing:

* **perturbed answers** by entity swap: the answer's key entity — its last run of capitalised words
  (or number) that the question does not mention — is replaced by the same kind of span (number,
  place "City, Country", or name) from other records' answers, ``n_perturbed`` times ("… born in Kuwait City, Kuwait" →
  "… born in Karachi, Pakistan"); an answer without such a span takes another record's answer whole;
* **a paraphrased question** per record by template (``paraphrase_question``): "What is X?" →
  "Could you tell me what X is?", and so on, with a generic wrapper as the fallback.

Every record is shown to the model as ``Question: {q}\\nAnswer:`` with the answer after a space
(:data:`loka.requests.QA_PROMPT`); as a request, the whole question is the subject, so the same request model holds.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ..errors import LokaError
from ..eval.data import load_qa
from ..requests import QA_PROMPT, EditRequest, ForgetRequest, RetainRequest, request_from_record
from .counterfact import DATA

SPLITS = {
    "forget01": "forget01_reconstructed.json",
    "forget05": "forget05_reconstructed.json",
    "forget10": "forget10_reconstructed.json",
    "retain": "retain_perturbed_subset_reconstructed.json",
}
_SPAN = re.compile(
    r"(?:[A-Z][\w'’\-]*(?:,? (?:(?:of|de|the|and|al|el|van|von|da|la|du|bin)\s)?[A-Z][\w'’\-]*)*)|\d[\d,./]*"
)

_PARA = [
    (re.compile(r"^What is (.+)\?$"), "Could you tell me what {0} is?"),
    (re.compile(r"^What are (.+)\?$"), "Could you tell me what {0} are?"),
    (re.compile(r"^Who is (.+)\?$"), "Can you say who {0} is?"),
    (re.compile(r"^In which (.+)\?$"), "Which {0}?"),
    (re.compile(r"^How (?:does|did|has) (.+)\?$"), "Describe how {0}."),
    (re.compile(r"^Can you (.+)\?$"), "Please {0}."),
    (re.compile(r"^(?:Does|Did|Has|Is|Was) (.+)\?$"), "Tell me whether {0}."),
]


def paraphrase_question(q: str) -> str:
    """A templated paraphrase of a question (the first matching rule, else a generic wrapper)."""
    q = q.strip()
    for pat, tmpl in _PARA:
        m = pat.match(q)
        if m:
            return tmpl.format(*m.groups())
    return f"Here is a question about an author. {q}"


def _spans(text: str) -> list[str]:
    out = []
    for m in _SPAN.finditer(text):
        s = m.group(0).strip(" ,.")
        if (m.start() == 0 or text[: m.start()].rstrip().endswith(".")) and not s[:1].isdigit():
            s = s.partition(" ")[2].lstrip(
                ", "
            )  # a sentence's first word ("The", "Yes,", "Author") is no entity
        if s:
            out.append(s)
    return out


def _kind(span: str) -> str:
    return "number" if span[0].isdigit() else "place" if ", " in span else "name"


def key_entity(question: str, answer: str) -> str | None:
    """The answer's last capitalised span (or number) that the question does not contain."""
    cands = [s for s in _spans(answer) if s not in question]
    return cands[-1] if cands else None


def _entity_pools(records: list[dict]) -> tuple[list[str | None], dict[str, list[str]]]:
    """Each record's key entity, and the key entities of all records by kind (the swap candidates)."""
    keys = [key_entity(r["question"], r["answer"]) for r in records]
    pools: dict[str, list[str]] = {}
    for k in sorted({k for k in keys if k}):
        pools.setdefault(_kind(k), []).append(k)
    return keys, pools


def _swap(answer: str, old: str, new: str) -> str:
    """``answer`` with its last occurrence of ``old`` replaced by ``new``."""
    j = answer.rfind(old)
    return answer[:j] + new + answer[j + len(old) :]


def perturb(records: list[dict], n_perturbed: int = 3, seed: int = 0) -> list[list[str]]:
    """For each record, ``n_perturbed`` wrong answers made by swapping its key entity (see module doc)."""
    rng = random.Random(seed)
    keys, pools = _entity_pools(records)
    out = []
    for i, (r, k) in enumerate(zip(records, keys)):
        pool = [x for x in pools.get(_kind(k), []) if x != k] if k else []
        alts: list[str] = []
        if k and pool:
            for x in rng.sample(pool, min(n_perturbed, len(pool))):
                alts.append(_swap(r["answer"], k, x))
        if len(alts) < n_perturbed and all(x["answer"] == r["answer"] for x in records):
            raise LokaError("perturb: need at least two records with different answers")
        while len(alts) < n_perturbed:  # no entity to swap: another record's answer whole
            j = rng.randrange(len(records))
            if j != i and records[j]["answer"] != r["answer"]:
                alts.append(records[j]["answer"])
        out.append(alts)
    return out


def load_split(name: str, folder: str | Path | None = None) -> list[dict]:
    """A TOFU split (``forget01/05/10``, ``retain``) from ``loka/data/tofu`` or ``folder``."""
    if name not in SPLITS:
        raise LokaError(f"unknown TOFU split {name!r}; choose from {sorted(SPLITS)}")
    path = Path(folder or DATA / "tofu") / SPLITS[name]
    if not path.exists():
        raise LokaError(f"TOFU split file {path} not found")
    return load_qa(path)


def build_mini_tofu(
    folder: str | Path | None = None, n_perturbed: int = 3, seed: int = 0
) -> dict[str, list[dict]]:
    """Every split with ``paraphrased_question`` and ``perturbed_answer`` added; also ``all`` (every
    distinct forget question + retain: the fine-tuning set) and ``forget_all``."""
    splits = {n: load_split(n, folder) for n in SPLITS}
    seen: dict[str, dict] = {}
    for n in ("forget01", "forget05", "forget10", "retain"):
        for r in splits[n]:
            seen.setdefault(r["question"], dict(r))
    allrecs = list(seen.values())
    for r, alts in zip(allrecs, perturb(allrecs, n_perturbed, seed)):
        r.setdefault("perturbed_answer", alts)
        r.setdefault("paraphrased_question", paraphrase_question(r["question"]))
    out = {n: [seen[r["question"]] for r in recs] for n, recs in splits.items()}
    retain_q = {r["question"] for r in splits["retain"]}
    out["forget_all"] = [r for r in allrecs if r["question"] not in retain_q]
    out["all"] = allrecs
    return out


#: What replaces a key entity in a ReLearn rewrite, by the entity's kind (:func:`_kind`).
VAGUE_ENTITY = {
    "place": "a place I cannot name",
    "number": "a date or number I cannot confirm",
    "name": "a name I do not recall",
}


def _rewrite_entity(question: str, answer: str) -> tuple[int, str] | None:
    """Where the fact to hide starts in ``answer``, and the fact: the first capitalised span (or
    number) that the question does not name, from its opening quote when it is inside one (a title).
    Stricter than :func:`key_entity` (which the perturbed answers keep using, so that cached TOFU
    evaluations stay valid): leading lower-case words ("of Hsiao Yun-Hwa") and a possessive do not
    make a question's name new."""
    for m in _SPAN.finditer(answer):
        raw = m.group(0).rstrip(" ,.")
        lead = re.match(r"(?:[a-z][\w'’\-]*,?\s+)+", raw)
        start = m.start() + (lead.end() if lead else 0)
        span = answer[start : m.start() + len(raw)]
        if (start == 0 or answer[:start].rstrip().endswith(".")) and not span[:1].isdigit():
            continue  # a sentence's first word: "The", "Yes,", or the subject restated
        if not span or span.removesuffix("'s").removesuffix("’s") in question:
            continue
        if answer.count('"', 0, start) % 2 == 1:  # inside "…": hide the whole title
            start = answer.rfind('"', 0, start)
        return start, span
    return None


def relearn_rewrite(question: str, answer: str) -> str:
    """ReLearn's positive target for a TOFU answer, built offline by template.

    The paper rewrites each forget answer with an LLM into a fluent answer that carries no forgotten
    fact. Here: an answer with a named fact (:func:`_rewrite_entity`: the first place, name, title or
    number the question does not mention) keeps its sentence up to it; the fact becomes a vague phrase of
    its kind (:data:`VAGUE_ENTITY`; a title is a name) and the rest of the sentence goes ("… was born
    in Kuwait City, Kuwait." → "… was born in a place I cannot name."). An answer without one (its
    facts are lower-case words: "… was a florist") becomes a refusal about the question's named
    subject ("I do not have reliable information on that about Basil Mahfouz Al-Kuwaiti."). Facts
    before the named one stay in the rewrite: the template cannot tell them from restated context.
    """
    hit = _rewrite_entity(question, answer)
    if hit:
        start, span = hit
        head = re.sub(r"(?i)\b(?:the|an?)\s+$", "", answer[:start])
        return head + VAGUE_ENTITY[_kind(span)] + "."
    names = [
        re.sub(r"['’]s?$", "", m.group(0).strip(" ,."))
        for m in _SPAN.finditer(question)
        if m.start() > 0 and question[m.start() - 1] not in "\"'“‘" and not m.group(0)[:1].isdigit()
    ]
    if names:  # the question's longest name outside quotes: its subject, not a title
        return f"I do not have reliable information on that about {max(names, key=len)}."
    return "That is not something I have reliable information about."


def with_relearn_targets(records: list[dict]) -> list[dict]:
    """Copies of QA records with ``target_new`` = :func:`relearn_rewrite` (``loka data tofu --relearn``)."""
    return [{**r, "target_new": relearn_rewrite(r["question"], r["answer"])} for r in records]


def as_requests(records: list[dict], kind: type = ForgetRequest, *, relearn: bool = False) -> list:
    """Forget (``target_true`` = answer) or retain (``target_new`` = answer) requests; the subject is
    the question, the paraphrase is the templated question (:func:`loka.requests.request_from_record`).
    ``relearn=True`` gives each forget request its :func:`relearn_rewrite` as ``target_new`` (the
    replacement ReLearn learns; IdK and DPO would learn it too in place of a refusal, so it is off
    by default)."""
    if kind not in (ForgetRequest, RetainRequest):
        raise LokaError(f"as_requests: kind must be ForgetRequest or RetainRequest, not {kind}")
    if relearn and kind is not ForgetRequest:
        raise LokaError(
            "as_requests: relearn=True makes ReLearn rewrites of forget answers; kind must be ForgetRequest"
        )
    recs = with_relearn_targets(records) if relearn else records
    return [request_from_record(dict(r), f"tofu[{i}]", kind) for i, r in enumerate(recs)]


def tofu_edits(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` counterfactual edits of QA records (for a joint edit + forget task on mini-TOFU): each
    takes a record with a key entity (:func:`key_entity`) and swaps in the same kind of entity from
    another record, as :func:`perturb` does. Returns ``{question, answer (new), old_answer,
    paraphrased_question, new_entity, old_entity}`` — the entities let a metric check the swap itself,
    which ROUGE on a long answer that changes in one span cannot."""
    rng = random.Random(seed)
    keys, pools = _entity_pools(records)
    out = []
    for r, k in zip(records, keys):
        if len(out) == n:
            break
        pool = [x for x in pools.get(_kind(k), []) if x != k] if k else []
        if not pool:
            continue
        x = rng.choice(pool)
        out.append(
            {
                "question": r["question"],
                "answer": _swap(r["answer"], k, x),
                "old_answer": r["answer"],
                "new_entity": x,
                "old_entity": k,
                "paraphrased_question": r.get("paraphrased_question") or paraphrase_question(r["question"]),
            }
        )
    if len(out) < n:
        raise LokaError(
            f"tofu_edits: only {len(out)} of the records have a swappable key entity; asked for {n}"
        )
    return out


def edit_requests(edits: list[dict]) -> list[EditRequest]:
    """:class:`EditRequest` per :func:`tofu_edits` record (prompt :data:`QA_PROMPT`, the question as
    subject, the templated question as the paraphrase)."""
    return [
        EditRequest(
            QA_PROMPT,
            e["question"],
            e["answer"],
            target_true=e["old_answer"],
            paraphrases=[QA_PROMPT.format(e["paraphrased_question"])],
            case_id=f"tofu_edit[{i}]",
        )
        for i, e in enumerate(edits)
    ]
