"""The lifelong-editing stream (``loka data lifelong``) and the unedited model's scores on it
(``loka data lifelong-baseline``): determinism, the stream's rules at 10,000 records, the reader and
the metrics on records without a true answer, and the CLI's refusals."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from loka.bench.lifelong import (
    SOURCES,
    _char_parts,
    _word_parts,
    build_lifelong,
    dumps_records,
    meta_path,
    write_lifelong,
)
from loka.cli import main
from loka.eval.data import load_cases
from loka.eval.metrics import _case_rows, case_metrics, generation_scores, score_cases
from loka.utils.io import sha256_bytes

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "generated" / "lifelong_10000.json"


@pytest.fixture(scope="module")
def stream():
    t0 = time.perf_counter()
    recs, meta = build_lifelong(10_000, seed=0)
    return recs, meta, time.perf_counter() - t0


def _rw(r):
    return r["requested_rewrite"]


def _neighbour_subjects(r) -> list[str]:
    before, after = _rw(r)["prompt"].split("{}")
    return [p[len(before) : len(p) - len(after)] for p in r["neighborhood_prompts"]]


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the stream ------------------------------------------------------------------------------------
def test_same_seed_gives_the_same_bytes(tmp_path, capsys):
    for name in ("a", "b"):
        assert (
            _run(
                ["data", "lifelong", "--n", "300", "--seed", "3", "--out", str(tmp_path / f"{name}.json")],
                capsys,
            )[0]
            == 0
        )
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (
        _run(["data", "lifelong", "--n", "300", "--seed", "4", "--out", str(tmp_path / "c.json")], capsys)[0]
        == 0
    )
    assert (tmp_path / "c.json").read_bytes() != (tmp_path / "a.json").read_bytes()
    meta = json.loads(meta_path(tmp_path / "a.json").read_text())
    assert meta["command"] == f"loka data lifelong --n 300 --seed 3 --out {tmp_path / 'a.json'}"
    assert meta["composition"] == {"known": 300, "mquake": 0, "kg": 0, "synthetic": 0}
    assert meta["sha256"] == sha256_bytes((tmp_path / "a.json").read_bytes())


def test_a_shorter_stream_is_a_prefix_of_a_longer_one(stream):
    recs, _, _ = stream
    assert build_lifelong(300, seed=0)[0] == recs[:300]


def test_ten_thousand_records_in_memory_quickly(stream):
    recs, meta, seconds = stream
    assert len(recs) == 10_000 and seconds < 10
    assert sum(meta["composition"].values()) == 10_000
    assert all(meta["composition"][s] > 300 for s in SOURCES)


def test_sources_come_in_the_stated_order(stream):
    recs, meta, _ = stream
    order = [SOURCES.index(r["source"]) for r in recs]
    assert order == sorted(order)
    assert Counter(r["source"] for r in recs) == meta["composition"]
    assert [r["case_id"] for r in recs] == list(range(len(recs)))


def test_no_subject_relation_pair_twice_and_no_subject_in_two_sources(stream):
    recs, _, _ = stream
    pairs = Counter((_rw(r)["subject"].lower(), _rw(r)["relation_id"].split("/")[-1]) for r in recs)
    assert max(pairs.values()) == 1
    sources = defaultdict(set)
    for r in recs:
        sources[_rw(r)["subject"].lower()].add(r["source"])
    assert all(len(v) == 1 for v in sources.values())


def test_no_subject_is_a_prefix_or_suffix_of_another(stream):
    recs, _, _ = stream
    edited = {_rw(r)["subject"].lower() for r in recs}
    neighbours = {s.lower() for r in recs for s in _neighbour_subjects(r)}
    every = edited | neighbours
    assert not edited & neighbours  # no record edits a neighbourhood fact's subject
    assert not [(s, p) for s in edited for p in _word_parts(s) if p in every]
    assert not [(s, p) for s in neighbours for p in _word_parts(s) if p in edited]
    fictional = {_rw(r)["subject"].lower() for r in recs if r["source"] == "synthetic"}
    assert not [(s, p) for s in every for p in _char_parts(s) if p in fictional]
    assert not [(s, p) for s in fictional for p in _char_parts(s) if p in every]


def test_every_record_has_a_question_paraphrases_and_neighbours(stream):
    recs, _, _ = stream
    for r in recs:
        rw = _rw(r)
        subj, new = rw["subject"], rw["target_new"]["str"]
        assert rw["prompt"].count("{}") == 1 and new
        assert r["question"].endswith("?") and subj in r["question"]
        assert len(r["paraphrase_prompts"]) >= 2 and all(subj in p for p in r["paraphrase_prompts"])
        assert rw["prompt"].replace("{}", subj) not in r["paraphrase_prompts"]
        assert len(r["neighborhood_prompts"]) >= 2
        assert len(r["neighborhood_answers"]) == len(r["neighborhood_prompts"])
        assert all(a.lower() != new.lower() for a in r["neighborhood_answers"])
        assert (rw["target_true"] is None) == (r["source"] == "synthetic")
        if rw["target_true"]:
            assert rw["target_true"]["str"].lower() != new.lower()


def test_the_shipped_file_is_what_the_command_builds(stream):
    recs, _, _ = stream
    meta = json.loads(meta_path(SHIPPED).read_text())
    assert meta["command"] == "loka data lifelong --n 10000 --seed 0 --out data/generated/lifelong_10000.json"
    data = dumps_records(recs)
    assert sha256_bytes(data) == meta["sha256"], "rebuild it with the command in its .meta.json"
    assert SHIPPED.stat().st_size == len(data)


# ---- reading and scoring -----------------------------------------------------------------------------
def test_load_cases_reads_the_stream_with_questions(stream, tmp_path):
    recs, meta, _ = stream
    firsts = [next(r for r in recs if r["source"] == s) for s in SOURCES]
    write_lifelong(firsts, meta, tmp_path / "s.json", "test")
    cases = load_cases(tmp_path / "s.json")
    assert len(cases) == 4
    for c, r in zip(cases, firsts):
        assert c.question == r["question"] and c.target_new == _rw(r)["target_new"]["str"]
        assert c.neighborhood_answers == r["neighborhood_answers"] and len(c.paraphrase) == 2
    assert cases[-1].target_true is None and cases[0].target_true is not None


def test_load_cases_checks_the_new_fields(tmp_path):
    from loka.errors import RequestError

    rec = {
        "requested_rewrite": {"prompt": "{} plays the", "subject": "A B", "target_new": {"str": "piano"}},
        "neighborhood_prompts": ["C D plays the"],
        "neighborhood_answers": ["guitar", "violin"],
    }
    (tmp_path / "bad.json").write_text(json.dumps([rec]))
    with pytest.raises(RequestError, match="neighborhood_answers"):
        load_cases(tmp_path / "bad.json")
    rec.update(neighborhood_answers=["guitar"], question=3)
    (tmp_path / "bad.json").write_text(json.dumps([rec]))
    with pytest.raises(RequestError, match="question"):
        load_cases(tmp_path / "bad.json")


def test_neighbours_are_scored_against_their_own_answers(stream, tmp_path):
    recs, meta, _ = stream
    insertion = next(r for r in recs if r["source"] == "synthetic")
    write_lifelong([insertion], meta, tmp_path / "s.json", "test")
    case = load_cases(tmp_path / "s.json")[0]
    keys, prompts, targets = _case_rows(case)
    k = len(case.neighborhood)
    assert keys.count(("neighborhood", "true")) == k and ("rewrite", "true") not in keys
    assert targets[-k:] == case.neighborhood_answers and prompts[-k:] == case.neighborhood


def test_metrics_of_an_insertion_skip_es_ps_and_keep_ns(stream, tmp_path):
    import loka

    recs, meta, _ = stream
    two = [recs[0], next(r for r in recs if r["source"] == "synthetic")]
    write_lifelong(two, meta, tmp_path / "s.json", "test")
    cases = load_cases(tmp_path / "s.json")
    handle = loka.load_model("tiny-llama")
    rewrite, insertion = (case_metrics(s, s) for s in score_cases(handle, cases))
    assert {"ES", "PS", "NS", "EM", "PM", "NM", "reliability", "locality"} <= set(rewrite)
    assert not {"ES", "PS", "EM", "PM"} & set(insertion)
    assert {"NS", "NM", "reliability", "generalization", "locality"} <= set(insertion)
    gen = generation_scores(handle, cases[1], max_new_tokens=3, ge_tokens=3)
    assert (
        gen["qa_success"] in (0.0, 1.0)
        and case_metrics({"_gen": gen}, None)["qa_success"] == gen["qa_success"]
    )


# ---- the CLI ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", ["0", "-5", "50000"])
def test_bad_n_is_one_line_and_exit_2(n, tmp_path, capsys):
    rc, out, err = _run(["data", "lifelong", "--n", n, "--out", str(tmp_path / "s.json")], capsys)
    assert rc == 2 and err.startswith("error: --n must be between 1 and 20,000") and err.count("\n") == 1
    assert not (tmp_path / "s.json").exists()


def test_unwritable_out_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc, _, err = _run(["data", "lifelong", "--n", "5", "--out", str(tmp_path / "file" / "s.json")], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_existing_output_needs_force_and_must_be_ours(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert _run(["data", "lifelong", "--n", "5", "--out", str(out)], capsys)[0] == 0
    rc, _, err = _run(["data", "lifelong", "--n", "6", "--out", str(out)], capsys)
    assert rc == 2 and "--force" in err and err.count("\n") == 1
    assert _run(["data", "lifelong", "--n", "6", "--out", str(out), "--force"], capsys)[0] == 0
    assert len(json.loads(out.read_text())) == 6
    out.write_text(out.read_text().replace('"case_id":0', '"case_id":9'))  # changed since: no longer ours
    rc, _, err = _run(["data", "lifelong", "--n", "6", "--out", str(out), "--force"], capsys)
    assert rc == 2 and "never replaces" in err
    other = tmp_path / "other.json"
    other.write_text("[]")
    rc, _, err = _run(["data", "lifelong", "--n", "5", "--out", str(other), "--force"], capsys)
    assert rc == 2 and "never replaces" in err and other.read_text() == "[]"


def test_baseline_is_resumable(tmp_path, capsys):
    data, out = tmp_path / "s.json", tmp_path / "b.jsonl"
    assert _run(["data", "lifelong", "--n", "8", "--out", str(data)], capsys)[0] == 0
    base = ["data", "lifelong-baseline", "--model", "tiny-llama", "--data", str(data), "--out", str(out)]
    rc, text, _ = _run([*base, "--n", "4"], capsys)
    assert rc == 0 and "for 4 records" in text
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "loka-lifelong-baseline" and len(lines) == 5
    assert _run([*base, "--n", "4"], capsys)[0] == 2  # neither --resume nor --force
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # an interrupted last line
    rc, text, _ = _run([*base, "--resume", "--json"], capsys)
    info = json.loads(text)
    assert rc == 0 and info["records"] == 8 and info["scored_now"] == 5
    rows = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert [r["case_id"] for r in rows] == list(range(8))
    assert {"ES", "PS", "NS"} <= set(rows[0]["metrics"]) and rows[0]["mean_logprob"]["neighborhood"]["true"]
    rc, _, err = _run([*base[:3], "tiny-gpt2", *base[4:], "--resume"], capsys)
    assert rc == 2 and "not of tiny-gpt2" in err
    rc, _, err = _run([*base[:-1], str(data), "--force"], capsys)  # the stream is no baseline file
    assert rc == 2 and "never replaces" in err


def test_output_file_rules_shared_by_file_outputs(tmp_path):
    """utils.io.check_output_file (the stream, GGUF exports): a link, a folder or a companion that is not
    a file is refused; an existing file only when it is loka's and with force; nothing is touched."""
    from loka.errors import OutputError
    from loka.utils.io import check_output_file

    def ours(p):
        return p.is_file() and p.read_text() == "ours"

    out, side = tmp_path / "a.json", tmp_path / "a.meta.json"
    assert check_output_file(out, is_ours=ours, what="a test file", force=False, companions=(side,)) == out
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path / "dir.json", is_ours=ours, what="a test file", force=True)
    (tmp_path / "link.json").symlink_to(out)
    with pytest.raises(OutputError, match="symbolic link"):
        check_output_file(tmp_path / "link.json", is_ours=ours, what="a test file", force=True)
    side.write_text("theirs")  # only the companion exists: still a decision about the pair
    with pytest.raises(OutputError, match="never replaces"):
        check_output_file(out, is_ours=ours, what="a test file", force=True, companions=(side,))
    out.write_text("ours")
    with pytest.raises(OutputError, match="pass --force"):
        check_output_file(out, is_ours=ours, what="a test file", force=False)
    assert check_output_file(out, is_ours=ours, what="a test file", force=True) == out
    assert out.read_text() == "ours" and side.read_text() == "theirs"
