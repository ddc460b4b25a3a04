import json
from collections import defaultdict

import pytest

from loka import RequestError
from loka.bench.counterfact import build_counterfact, load_known, mquake_facts
from loka.eval.data import load_cases, load_qa
from loka.relations import RELATIONS

from .conftest import DATA, PKG_DATA


def test_counterfact_zsre_mquake_readers():
    cf = load_cases(DATA / "counterfact_sample5.json")
    assert len(cf) == 5 and cf[0].paraphrase and cf[0].neighborhood and cf[0].target_true
    zs = load_cases(DATA / "zsre_sample5.json")
    raw = json.loads((DATA / "zsre_sample5.json").read_text())
    assert zs[0].target_new == raw[0]["alt"] and zs[0].paraphrase == [raw[0]["rephrase"]]
    assert zs[0].locality[0][1] == raw[0]["loc_ans"]
    mq = load_cases(PKG_DATA / "mquake" / "MQuAKE-hard.json", n=3)
    assert len(mq) == 3 and len(mq[0].requests) >= 2 and len(mq[0].multihop["questions"]) == 3


def test_tofu_reader_and_errors(tmp_path):
    qa = load_qa(PKG_DATA / "tofu" / "forget01_reconstructed.json")
    assert len(qa) == 40 and qa[0]["answer"]
    with pytest.raises(RequestError, match="for unlearning"):
        load_cases(PKG_DATA / "tofu" / "forget01_reconstructed.json")
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps([{"question": "q", "answer": ""}]))
    with pytest.raises(RequestError, match="'answer' must be a non-empty string"):
        load_qa(bad)
    bad.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(RequestError, match="unrecognised record"):
        load_cases(bad)
    bad.write_text(
        json.dumps(
            [{"src": "What is X?", "subject": "Y", "alt": "a", "rephrase": "r", "loc": "l", "loc_ans": "x"}]
        )
    )
    with pytest.raises(RequestError, match="subject 'Y' does not occur"):
        load_cases(bad)
    bad.write_text(json.dumps([{"requested_rewrite": {"prompt": "{} x", "subject": "s"}}]))
    with pytest.raises(RequestError, match="target_new"):
        load_cases(bad)


def test_generated_counterfact_records_follow_the_recipe():
    facts = load_known()
    recs = build_counterfact(facts, 60, seed=3)
    assert len(recs) == 60 and recs == build_counterfact(facts, 60, seed=3)
    by = defaultdict(set)
    true_of = {}
    for f in facts:
        by[f["relation_id"]].add(f["attribute"])
        true_of[(f["relation_id"], f["subject"])] = f["attribute"]
    for r in recs:
        rw = r["requested_rewrite"]
        rel, subj = rw["relation_id"], rw["subject"]
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        assert rw["target_new"]["str"] in by[rel]  # another object seen with the same relation
        edit_text = rw["prompt"].replace("{}", subj)
        assert len(r["paraphrase_prompts"]) >= 2 and edit_text not in r["paraphrase_prompts"]
        assert all(subj in p for p in r["paraphrase_prompts"])
        assert len(r["neighborhood_prompts"]) >= 5
        for p in r["neighborhood_prompts"]:  # other subjects, same relation, same true object
            assert not p.startswith(subj + " ")
            owners = [s for (rl, s) in true_of if rl == rel and s in p and s != subj]
            assert any(true_of[(rel, s)] == rw["target_true"]["str"] for s in owners)
    assert len(RELATIONS) == 33 and all(len(v["cloze"]) >= 3 for v in RELATIONS.values())


def test_mquake_facts_extend_the_known_facts_past_1000_records(tmp_path):
    known = load_known()
    extra = mquake_facts(exclude=known)
    keys = {(f["subject"], f["relation_id"]) for f in known}
    assert len(extra) == 608 and all(f["relation_id"] in RELATIONS for f in extra)
    assert not keys & {(f["subject"], f["relation_id"]) for f in extra}  # nothing the known facts hold
    assert all(
        f["prompt"] == RELATIONS[f["relation_id"]]["cloze"][0].replace("{}", f["subject"]) for f in extra
    )
    recs = build_counterfact(known + extra, None, seed=0, min_subjects=1)
    assert len(build_counterfact(known, None, seed=0, min_subjects=1)) == 920 and len(recs) >= 1000
    assert len(
        {r["requested_rewrite"]["subject"] + r["requested_rewrite"]["relation_id"] for r in recs}
    ) == len(recs)
    bad = tmp_path / "mq.json"
    bad.write_text(json.dumps([{"case_id": 1}]))
    with pytest.raises(Exception, match=r"mq.json\[0\]: not an MQuAKE record"):
        mquake_facts(bad)
