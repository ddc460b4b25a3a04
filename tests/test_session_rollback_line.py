"""``loka session DIR --rollback-last N --yes`` first says in one line what it removed (how many batches
and requests, their ids) and how many batches the session holds now, then the summary; ``--json`` has
the same under ``removed``."""

from __future__ import annotations

import json

import loka
from loka.cli import main

MEMOIR = ["--method", "memoir", "--set", "layer=1", "--set", "n_iter=2", "--set", "n_prefixes=1"]


def _edit(capsys, sess, reqs_file) -> None:
    code = main(
        [
            "edit",
            "--model",
            "tiny-llama",
            *MEMOIR,
            "--requests",
            str(reqs_file),
            "--state",
            str(sess),
            "--json",
        ]
    )
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()


def _requests(path, n: int):
    subjects = ["Zorblax Quint", "Perla Vint", "Mira Olde"][:n]
    path.write_text(
        "".join(
            json.dumps({"prompt": "{} was born in", "subject": s, "target_new": "Qx"}) + "\n"
            for s in subjects
        )
    )
    return path


def test_rollback_last_says_what_it_removed(capsys, tmp_path):
    sess = tmp_path / "sess"
    _edit(capsys, sess, _requests(tmp_path / "one.jsonl", 1))
    _edit(capsys, sess, _requests(tmp_path / "three.jsonl", 3))
    last = loka.load_artifact(sess / "batches" / "batch_00001.loka")
    assert len(last.manifest["requests"]) == 3

    code = main(["session", str(sess), "--rollback-last", "1", "--yes"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    lines = cap.out.splitlines()
    assert lines[0] == f"removed 1 batch (3 requests): {last.id}; the session now holds 1 batch"
    assert "1 batch(es), 1 edit(s)" in lines[1] and not (sess / "batches" / "batch_00001.loka").exists()

    _edit(capsys, sess, _requests(tmp_path / "three.jsonl", 3))
    ids = [loka.load_artifact(sess / "batches" / f"batch_0000{k}.loka").id for k in (0, 1)]
    code = main(["session", str(sess), "--rollback-last", "2", "--yes", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and info["batches"] == 0
    assert [(b["id"], b["requests"]) for b in info["removed"]] == [(ids[0], 1), (ids[1], 3)]


def test_without_a_rollback_nothing_is_said_removed(capsys, tmp_path):
    sess = tmp_path / "sess"
    _edit(capsys, sess, _requests(tmp_path / "one.jsonl", 1))
    assert main(["session", str(sess)]) == 0
    out = capsys.readouterr().out
    assert "removed" not in out and out.startswith(f"{sess}: ")
    assert main(["session", str(sess), "--json"]) == 0
    assert "removed" not in json.loads(capsys.readouterr().out)
