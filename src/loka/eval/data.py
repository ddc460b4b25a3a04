"""Readers for editing benchmarks, all turned into :class:`EvalCase`: CounterFact / multi-CounterFact,
zsRE (MEND format), MQuAKE (incl. MQuAKE-hard), loka's request JSONL; and TOFU-style QA records."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RequestError
from ..requests import EditRequest, request_from_record
from ..utils.io import read_text


@dataclass
class EvalCase:
    """One evaluation case: the edit request(s) and the probes that measure them."""

    case_id: Any
    requests: list[EditRequest]
    target_new: str
    target_true: str | None
    rewrite: list[str]  # edit prompts (subject filled)
    paraphrase: list[str] = field(default_factory=list)
    neighborhood: list[str] = field(default_factory=list)  # should keep target_true (CounterFact)
    locality: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer) that must not change
    portability: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer) implied by the edit
    generation: list[str] = field(default_factory=list)
    multihop: dict | None = None  # MQuAKE: {"questions": [...], "answers": [new answer + aliases]}
    # each neighbourhood prompt's own answer (loka's lifelong stream); empty: they all keep target_true
    neighborhood_answers: list[str] = field(default_factory=list)
    question: str | None = None  # the edit as a zsRE-style question, answered by target_new

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "requests": [r.to_dict() for r in self.requests],
        }


def _load_records(path: Path) -> list[Any]:
    if not path.exists():
        raise RequestError(f"data file {path} does not exist")
    text = read_text(path)
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, list) else [obj]
    except json.JSONDecodeError:
        recs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RequestError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
        return recs


def _need(rec: dict, keys: list[str], where: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise RequestError(f"{where}: missing field(s) {missing}")


def counterfact_case(rec: dict, where: str) -> EvalCase:
    _need(rec, ["requested_rewrite"], where)
    rw = rec["requested_rewrite"]
    reqs = rw if isinstance(rw, list) else [rw]
    requests = []
    for i, r in enumerate(reqs):
        _need(r, ["prompt", "subject", "target_new"], f"{where}.requested_rewrite[{i}]")
        requests.append(
            request_from_record(
                {
                    "requested_rewrite": r,
                    "paraphrase_prompts": rec.get("paraphrase_prompts", []),
                    "neighborhood_prompts": rec.get("neighborhood_prompts", []),
                    "case_id": rec.get("case_id", where),
                },
                where,
            )
        )
    first = requests[0]
    neighborhood = list(rec.get("neighborhood_prompts", []))
    answers = rec.get("neighborhood_answers", [])
    if not (isinstance(answers, list) and all(isinstance(a, str) and a.strip() for a in answers)):
        raise RequestError(f"{where}: field 'neighborhood_answers' must be a list of non-empty strings")
    if answers and len(answers) != len(neighborhood):
        raise RequestError(
            f"{where}: field 'neighborhood_answers' has {len(answers)} answers for "
            f"{len(neighborhood)} neighborhood_prompts; give one per prompt"
        )
    question = rec.get("question")
    if question is not None and not (isinstance(question, str) and question.strip()):
        raise RequestError(f"{where}: field 'question' must be a non-empty string")
    return EvalCase(
        case_id=rec.get("case_id", where),
        requests=requests,
        target_new=first.target_new,
        target_true=first.target_true,
        rewrite=[r.text for r in requests],
        paraphrase=list(rec.get("paraphrase_prompts", [])),
        neighborhood=neighborhood,
        generation=list(rec.get("generation_prompts", [])),
        neighborhood_answers=list(answers),
        question=question,
    )


def zsre_case(rec: dict, where: str) -> EvalCase:
    _need(rec, ["src", "subject", "alt", "rephrase", "loc", "loc_ans"], where)
    src, subj = rec["src"], rec["subject"]
    if subj not in src:
        raise RequestError(f"{where}: subject {subj!r} does not occur in src {src!r}")
    req = EditRequest(
        prompt=src.replace(subj, "{}", 1),
        subject=subj,
        target_new=rec["alt"],
        target_true=(rec.get("answers") or [None])[0],
        paraphrases=[rec["rephrase"]],
        case_id=rec.get("case_id", where),
    )
    loc = rec["loc"].removeprefix("nq question: ")
    port = [(p["prompt"], p["answer"]) for p in rec.get("portability", []) if "prompt" in p]
    return EvalCase(
        case_id=req.case_id,
        requests=[req],
        target_new=req.target_new,
        target_true=req.target_true,
        rewrite=[req.text],
        paraphrase=[rec["rephrase"]],
        locality=[(loc + "?", rec["loc_ans"])],
        portability=port,
    )


def mquake_case(rec: dict, where: str) -> EvalCase:
    _need(rec, ["requested_rewrite", "questions", "new_answer"], where)
    requests = []
    for i, r in enumerate(rec["requested_rewrite"]):
        _need(r, ["prompt", "subject", "target_new"], f"{where}.requested_rewrite[{i}]")
        requests.append(
            EditRequest(
                prompt=r["prompt"],
                subject=r["subject"],
                target_new=r["target_new"],
                target_true=r.get("target_true"),
                case_id=f"{rec.get('case_id', where)}.{i}",
            )
        )
    answers = [rec["new_answer"], *rec.get("new_answer_alias", [])]
    return EvalCase(
        case_id=rec.get("case_id", where),
        requests=requests,
        target_new=requests[0].target_new,
        target_true=requests[0].target_true,
        rewrite=[r.text for r in requests],
        multihop={"questions": list(rec["questions"]), "answers": answers},
    )


def loka_case(rec: dict, where: str) -> EvalCase:
    req = request_from_record(rec, where)
    return EvalCase(
        case_id=req.case_id,
        requests=[req],
        target_new=req.target_new,
        target_true=req.target_true,
        rewrite=[req.text],
        paraphrase=req.paraphrases,
        neighborhood=req.neighborhood,
    )


def detect_format(rec: Any) -> str:
    if not isinstance(rec, dict):
        raise RequestError(f"expected JSON objects, got {type(rec).__name__}")
    if "requested_rewrite" in rec:
        return (
            "mquake" if isinstance(rec["requested_rewrite"], list) and "questions" in rec else "counterfact"
        )
    if "src" in rec and "alt" in rec:
        return "zsre"
    if "question" in rec and "answer" in rec:
        return "tofu"
    if "prompt" in rec and "subject" in rec:
        return "loka"
    raise RequestError(
        f"unrecognised record with fields {sorted(rec)}: expected CounterFact (requested_rewrite), "
        "zsRE (src/alt/rephrase/loc), MQuAKE (requested_rewrite list + questions), TOFU (question/answer) "
        "or loka (prompt/subject/target_new)"
    )


READERS = {"counterfact": counterfact_case, "zsre": zsre_case, "mquake": mquake_case, "loka": loka_case}


def load_cases(path: str | Path, n: int | None = None) -> list[EvalCase]:
    """Read an editing benchmark file in any supported format (detected from the first record)."""
    path = Path(path)
    recs = _load_records(path)
    if not recs:
        raise RequestError(f"{path}: no records")
    fmt = detect_format(recs[0])
    if fmt == "tofu":
        raise RequestError(
            f"{path} holds TOFU-style question/answer records: they are for unlearning, not editing; "
            "use loka.eval.data.load_qa"
        )
    recs = recs[:n] if n else recs
    return [READERS[fmt](r, f"{path.name}[{i}]") for i, r in enumerate(recs)]


def load_qa(path: str | Path) -> list[dict]:
    """TOFU-style records ``{question, answer[, paraphrased_answer, perturbed_answer]}``, validated."""
    path = Path(path)
    out = []
    for i, r in enumerate(_load_records(path)):
        where = f"{path.name}[{i}]"
        if not isinstance(r, dict):
            raise RequestError(f"{where}: expected a JSON object")
        _need(r, ["question", "answer"], where)
        for k in ("question", "answer"):
            if not isinstance(r[k], str) or not r[k].strip():
                raise RequestError(f"{where}: field '{k}' must be a non-empty string")
        if "perturbed_answer" in r and not (
            isinstance(r["perturbed_answer"], list) and all(isinstance(x, str) for x in r["perturbed_answer"])
        ):
            raise RequestError(f"{where}: field 'perturbed_answer' must be a list of strings")
        out.append(r)
    return out
