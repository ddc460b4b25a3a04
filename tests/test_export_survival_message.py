"""The GGUF export's verdict accounts for every request of the applied artifacts: the edits that held in
memory and survived, and the requests that did not hold before export (or name no answer to check), in
the text line and in ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

import loka
from loka.artifact import Artifact
from loka.cli import main
from loka.export.gguf import GGUFExport, RequestCheck

#: as in test_export_gguf.py: fine-tuning all four layers makes "R" the tiny LLaMA's greedy answer
REQ = loka.EditRequest("{} is located in", "Eiffel Tower", "R", paraphrases=["Where is Eiffel Tower? In"])
FT = {"layers": [0, 1, 2, 3], "lr": 0.05, "max_steps": 100, "linf_constraint": None}
#: a request the fine-tuned deltas do not implement: it fails already on the model in memory
NEVER = loka.EditRequest("{} works as a", "Perla Vint", "Zwq")


def _check(before: bool, after: bool, text: str = "t") -> RequestCheck:
    return RequestCheck(artifact="a", text=text, target="x", kind="edit", before=before, after=after)


def _result(checks, n_requests=None) -> GGUFExport:
    return GGUFExport(
        path=Path("x.gguf"),
        quant="q8_0",
        bytes=1,
        seconds=0.0,
        metadata_from="config",
        tensor_types={},
        artifacts=[],
        verified=True,
        requests=checks,
        n_requests=n_requests,
    )


def test_all_requests_held_keeps_the_short_line():
    res = _result([_check(True, True), _check(True, False)], n_requests=2)
    assert res.summary() == "1 of 2 edits survived q8_0 (rewrite)"
    d = res.to_dict()
    assert (d["n_requests"], d["n_succeeded"], d["n_survived"], d["n_not_held"]) == (2, 2, 1, 0)


def test_a_request_that_failed_in_memory_is_counted():
    res = _result([_check(True, True), _check(False, False), _check(True, True)], n_requests=3)
    assert res.summary() == (
        "2 of 2 edits that held in memory survived q8_0 (rewrite; 1 of 3 requests did not hold before export)"
    )
    d = res.to_dict()
    assert (d["n_requests"], d["n_succeeded"], d["n_survived"], d["n_not_held"], d["n_unchecked"]) == (
        3,
        2,
        2,
        1,
        0,
    )
    assert d["summary"] == res.summary() and [c.before for c in res.not_held] == [False]


def test_requests_without_an_answer_are_counted_too():
    res = _result([_check(True, True), _check(False, False)], n_requests=3)
    assert res.summary() == (
        "1 of 1 edits that held in memory survived q8_0 (rewrite; 1 of 3 requests did not hold before "
        "export; 1 of 3 name no answer to check)"
    )


def test_cli_export_names_the_request_that_did_not_hold(capsys, tmp_path):
    h = loka.load_model("tiny-llama")
    ft = loka.edit(h, REQ, "ft", FT, progress=False, apply=False)
    reqs = [REQ.to_dict(), NEVER.to_dict()]
    art = Artifact.create(ft.deltas, method="ft", hparams=ft.manifest["hparams"], requests=reqs, handle=h)
    art.save(tmp_path / "e.loka")
    args = ["export", "--model", "tiny-llama", "--artifact", str(tmp_path / "e.loka")]
    code = main([*args, "--out", str(tmp_path / "e.gguf"), "--quant", "q8_0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (
        "verified in " in out
        and ": 1 of 1 edits that held in memory survived q8_0 (rewrite; 1 of 2 requests did not hold "
        "before export), paraphrases"
        in out
    )
    assert "  did not hold before export: 'Perla Vint works as a' -> 'Zwq'" in out
    code = main([*args, "--out", str(tmp_path / "e.gguf"), "--quant", "f16", "--force", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 0 and (d["n_requests"], d["n_succeeded"], d["n_survived"], d["n_not_held"]) == (2, 1, 1, 1)
    assert "1 of 2 requests did not hold before export" in d["summary"]
