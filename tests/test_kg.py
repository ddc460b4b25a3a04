"""KnowledgeSmith: graph format and builds, probe generator, diagnostics, runner, CLI and report."""

from __future__ import annotations

import json
import math

import pytest
import torch

import loka
from loka.bench.kg import (
    KGError,
    KnowledgeGraph,
    Node,
    Relation,
    Triple,
    build_curated,
    build_derived,
    load_graph,
    parse_source,
)
from loka.bench.probes import PROBE_TYPES, generate_probes, make_interventions
from loka.cli import main as cli
from loka.eval import kg_metrics as km

from .browser import chrome, full_page_screenshot, rendered_images


@pytest.fixture(scope="module")
def curated():
    return build_curated()


# ---- graphs ---------------------------------------------------------------------------------------
def test_curated_graph_has_four_domains_three_levels_and_150_triples_each(curated):
    st = curated.stats()
    assert sorted(st) == ["biology", "economics", "history", "physics"]
    for d, x in st.items():
        assert x["triples"] >= 150, d
        assert all(x["nodes"].get(lv, 0) > 0 for lv in ("root", "intermediate", "leaf")), d
        assert all(x["triples_by_head_level"].get(lv, 0) > 0 for lv in ("root", "intermediate", "leaf")), d
        assert x["two_hop_chains"] > 50, d
    # a fact we wrote, typed and levelled as declared
    lion = curated.nodes["biology:Lion"]
    assert (lion.type, lion.level) == ("species", "leaf")
    assert curated.tails("biology:Lion", "biology/family") == ["biology:Felidae"]


def test_shipped_graph_json_is_the_build_of_the_sources(curated):
    shipped = load_graph(loka.bench.kg.DATA / "kg" / "curated.json")
    assert shipped.to_dict() == curated.to_dict()


def test_derived_graph_from_known_facts_and_mquake_chains():
    g = build_derived()
    assert len(g.triples) > 1500 and {n.level for n in g.nodes.values()} == {"root", "intermediate", "leaf"}
    # MQuAKE-hard's first chain: Hey Jude -performer-> The Beatles -director-> Brian Epstein
    assert g.tails("wikidata:Hey Jude", "P175") == ["wikidata:The Beatles"]
    assert "wikidata:Brian Epstein" in g.tails("wikidata:The Beatles", "P1037")
    assert g.nodes["wikidata:United Kingdom"].level == "root"  # object of many facts
    assert g.stats()["wikidata"]["two_hop_chains"] > 500


def _tiny_graph(**over):
    rel = Relation("cap", "capital", "country", "city", "The capital of {} is")
    nodes = {
        f"d:{n}": Node(f"d:{n}", n, t, lv, "d")
        for n, t, lv in [("France", "country", "root"), ("Paris", "city", "leaf")]
    }
    triples = [Triple("d:France", "cap", "d:Paris")]
    args = {"relations": {"cap": rel}, "nodes": nodes, "triples": triples, **over}
    return KnowledgeGraph("t", args["relations"], args["nodes"], args["triples"])


def test_graph_validation_names_the_field():
    _tiny_graph()
    with pytest.raises(KGError, match="'level'"):
        _tiny_graph(
            nodes={
                "d:France": Node("d:France", "France", "country", "top", "d"),
                "d:Paris": Node("d:Paris", "Paris", "city", "leaf", "d"),
            }
        )
    with pytest.raises(KGError, match="'cloze'"):
        _tiny_graph(relations={"cap": Relation("cap", "capital", "country", "city", "The capital is")})
    with pytest.raises(KGError, match="head 'd:Paris' has type 'city' but relation 'cap' wants 'country'"):
        _tiny_graph(triples=[Triple("d:Paris", "cap", "d:France")])
    with pytest.raises(KGError, match="no declared node"):
        _tiny_graph(triples=[Triple("d:France", "cap", "d:Lyon")])
    with pytest.raises(KGError, match="duplicate"):
        _tiny_graph(triples=[Triple("d:France", "cap", "d:Paris")] * 2)
    with pytest.raises(KGError, match="names no declared relation"):
        _tiny_graph(triples=[Triple("d:France", "capital", "d:Paris")])


def test_source_format_errors_carry_file_and_line():
    ok = "@domain d\n@type country root\n@type city leaf\n@relation cap | capital | country -> city | The capital of {} is\n"
    dom, rels, nodes, triples = parse_source(ok + "cap: France = Paris; Italy = Rome\n")
    assert dom == "d" and len(triples) == 2 and nodes["d:Rome"].level == "leaf"
    with pytest.raises(KGError, match=r"src:5: .*declared relation"):
        parse_source(ok + "capitol: France = Paris\n", where="src")
    with pytest.raises(KGError, match="'head = tail'"):
        parse_source(ok + "cap: France - Paris\n")
    with pytest.raises(KGError, match="has no level"):
        parse_source(
            "@domain d\n@type country root\n@relation cap | capital | country -> city | {} x\ncap: A = B\n"
        )
    with pytest.raises(KGError, match="is a 'city' elsewhere"):
        parse_source(ok + "cap: France = Paris; Paris = Rome\n")


def test_csv_and_json_round_trip(tmp_path, curated):
    p = tmp_path / "g.csv"
    p.write_text(
        "head,relation,tail,domain,head_type,tail_type,head_level,tail_level,noun\n"
        "France,cap,Paris,geo,country,city,root,leaf,capital\nItaly,cap,Rome,geo,country,city,root,leaf,capital\n"
    )
    g = load_graph(p)
    assert g.tails("geo:Italy", "cap") == ["geo:Rome"] and g.relations["cap"].cloze == "The capital of {} is"
    bad = tmp_path / "bad.csv"
    bad.write_text("head,relation,tail\nFrance,cap,Paris\n")
    with pytest.raises(KGError, match="CSV header lacks"):
        load_graph(bad)
    j = curated.save(tmp_path / "g.json")
    assert load_graph(j).to_dict() == curated.to_dict()
    (tmp_path / "x.json").write_text('{"nodes": []}')
    with pytest.raises(KGError, match="loka-kg"):
        load_graph(tmp_path / "x.json")
    (tmp_path / "broken.json").write_text('{"format": "loka-kg", ')
    with pytest.raises(KGError, match="not valid JSON"):
        load_graph(tmp_path / "broken.json")
    with pytest.raises(KGError, match="loka kg build"):
        load_graph(tmp_path / "missing.json")
    assert loka.bench.kg.resolve_graph("curated").to_dict() == curated.to_dict()


# ---- probes ---------------------------------------------------------------------------------------
def _true_options(g, p, iv) -> list[int]:
    """Options that are true in the graph *after* the update, checked from the triples themselves."""
    s, r = iv.head, iv.relation
    y = iv.new if iv.task == "edit" else iv.old
    name = {g.name_of(x): x for x in g.nodes if g.nodes[x].domain == p.domain}

    def holds_after(h, rel, t):
        if (h, rel) == (s, r):
            return iv.task == "edit" and t == iv.new
        return t in g.tails(h, rel)

    out = []
    for i, o in enumerate(p.options):
        if p.type in ("direct", "conflict"):
            ok = holds_after(s, r, name[o])
        elif p.type == "reverse":
            ok = holds_after(name[o], r, y)
        elif p.type == "multihop":
            r2 = p.relation.split(">")[1]
            ok = name[o] in g.tails(y, r2) if iv.task == "edit" else False
        elif p.type == "comparison":
            ok = False
            for h in g.role[(r, "head")]:
                for t in g.pool(r, "tail"):
                    if (
                        o.rstrip(".").lower()
                        == f"the {g.relations[r].noun} of {g.name_of(h)} is {g.name_of(t)}".lower()
                    ):
                        ok = holds_after(h, r, t)
        else:  # contextual: a fact the update does not touch
            ok = name[o] in g.tails(p.subject, p.relation)
        if ok:
            out.append(i)
    return out


@pytest.mark.parametrize("task", ["edit", "forget"])
@pytest.mark.parametrize("level", ["root", "intermediate", "leaf"])
def test_every_probe_has_one_true_option_and_same_type_distractors(curated, task, level):
    g = curated
    ivs, probes = generate_probes(g, level, 12, task, seed=3)
    assert len(ivs) == 12 and len({iv.head for iv in ivs}) == 12
    assert {p.type for p in probes} >= set(PROBE_TYPES) - ({"multihop"} if level == "root" else set())
    by_iv = {iv.index: iv for iv in ivs}
    for p in probes:
        iv = by_iv[p.intervention]
        assert len(p.options) == 4 and len(set(p.options)) == 4, p
        true = _true_options(g, p, iv)
        if p.type == "contextual" or task == "edit":
            assert true == [p.target], (p, true)
        else:  # unlearning: no option is the target; the forgotten answer is the original
            assert true == [] and p.target is None and p.original is not None, (p, true)
        if p.type in ("direct", "conflict", "contextual", "reverse", "multihop"):
            rel = p.relation.split(">")[-1]
            slot = "head" if p.type == "reverse" else "tail"
            want = g.relations[rel].__getattribute__(f"{slot}_type")
            types = {
                g.nodes[n].type
                for n in g.nodes
                if g.name_of(n) in p.options and g.nodes[n].domain == p.domain
            }
            assert types == {want}, (p.options, types)
    # phrasings: three different texts per Q+ type and intervention
    for t in ("direct", "reverse", "comparison", "conflict"):
        qs = [p for p in probes if p.type == t and p.intervention == 0]
        assert len({p.question for p in qs}) == 3 and len({p.cloze for p in qs}) == 3


def test_probes_are_seeded_and_options_shuffled(curated):
    a = generate_probes(curated, "leaf", 10, "edit", seed=7)[1]
    b = generate_probes(curated, "leaf", 10, "edit", seed=7)[1]
    c = generate_probes(curated, "leaf", 10, "edit", seed=8)[1]
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.to_dict() for p in a] != [p.to_dict() for p in c]
    positions = {p.target for p in a if p.target is not None}
    assert positions == {0, 1, 2, 3}
    mc = a[0].mc_prompt()
    assert mc.startswith(a[0].question) and "\nA. " in mc and "\nD. " in mc and mc.endswith("Answer:")


def test_interventions_spread_over_domains_prefer_known_and_refuse_too_many(curated):
    ivs = make_interventions(curated, "leaf", 8, "edit", seed=0)
    assert {iv.domain for iv in ivs} == {"biology", "economics", "history", "physics"}
    for iv in ivs:
        assert iv.new != iv.old and iv.new not in curated.tails(iv.head, iv.relation)
        assert curated.nodes[iv.new].type == curated.nodes[iv.old].type
        req = iv.request(curated)
        assert isinstance(req, loka.EditRequest) and req.subject in req.text and req.target_true
    forget = make_interventions(curated, "leaf", 4, "forget", seed=0)
    req = forget[0].request(curated)
    assert isinstance(req, loka.ForgetRequest) and req.target_true == curated.name_of(forget[0].old)
    pref = {
        t
        for t in curated.triples
        if curated.nodes[t.head].level == "leaf" and curated.nodes[t.head].domain == "history"
    }
    ivs = make_interventions(curated, "leaf", 4, "edit", seed=0, prefer=pref)
    assert [
        iv.domain
        for iv in ivs
        if (iv.head, iv.relation, iv.old) in {(t.head, t.relation, t.tail) for t in pref}
    ] == ["history"]
    big = make_interventions(loka.bench.kg.merge_graphs([curated, build_derived()]), "leaf", 1000, "edit")
    assert len(big) == 1000 and len({iv.head for iv in big}) == 1000  # the k = 1000 scale
    with pytest.raises(loka.RequestError, match="more interventions than"):
        make_interventions(curated, "root", 5000, "edit")
    with pytest.raises(loka.RequestError, match=r"unknown domain\(s\) \['chemistry'\]"):
        make_interventions(curated, "leaf", 1, domains=["chemistry"])
    with pytest.raises(loka.RequestError, match="level must be"):
        make_interventions(curated, "top", 1)


# ---- diagnostics on hand-built cases --------------------------------------------------------------
def _row(t, before, after, target=None, original=None, iv=0, claims=(), scope=""):
    return {
        "type": t,
        "before": before,
        "after": after,
        "target": target,
        "original": original,
        "intervention": iv,
        "claims": list(claims),
        "scope": scope,
    }


def test_ccr_rr_and_accuracy_by_hand():
    rows = [
        _row("contextual", 0, 0, 0, 0),
        _row("contextual", 1, 2, 1, 1),
        _row("contextual", 3, 3, 3, 3),
        _row("contextual", 2, 0, 2, 2),
        _row("direct", 1, 0, target=0, original=1),
        _row("direct", 1, 1, target=0, original=1),
        _row("reverse", 2, 2, target=2, original=None),
        _row("multihop", 3, 3, target=0, original=3),
    ]
    assert km.ccr(rows) == 0.5  # 2 of 4 contextual answers changed
    assert km.rr(rows) == pytest.approx(2 / 3)  # direct#2 and multihop kept the original; reverse has none
    assert km.accuracy([r for r in rows if r["type"] != "contextual"]) == pytest.approx(2 / 4)
    assert km.accuracy(rows, "original", "before") == pytest.approx(7 / 7)


def test_conflict_rate_by_hand():
    facts = {0: ("old", "new"), 1: ("old", "new"), 2: ("o", None), 3: ("o", None)}
    rows = [  # iv 0 asserts the old object in one probe and the new one in another: conflict
        _row("direct", 0, 0, claims=["new", "old"]),
        _row("conflict", 0, 1, claims=["new", "old"]),
        # iv 1 asserts only the new object; its reverse probe agrees: no conflict
        _row("direct", 0, 0, iv=1, claims=["new", "old"]),
        _row("reverse", 0, 0, iv=1, claims=["new", "not:new"]),
        # iv 2 (forget): the forgotten object in one context, another in the next: conflict
        _row("direct", 0, 0, iv=2, claims=["o", "x"]),
        _row("comparison", 1, 1, iv=2, claims=["o", "x"]),
        # iv 3 (forget): never asserts o: no conflict, but inconsistent (x and y)
        _row("direct", 1, 1, iv=3, claims=["o", "x", "y"]),
        _row("direct", 2, 2, iv=3, claims=["o", "x", "y"]),
    ]
    assert km.conflict_rate(rows, facts) == 0.5
    assert km.conflict_rate(rows, facts, when="before") == 0.25  # before, iv 0 said "new" twice
    assert km.inconsistency_rate(rows) == 0.75
    assert km.in_conflict(["new", "not:new"], "old", "new") is False
    assert km.inconsistent(["new", "not:new"]) is True


def test_kl_cka_and_log_minmax_by_hand():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    q = torch.tensor([[0.9, 0.1], [0.9, 0.1]]).log()
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert km.kl_divergence(p, q).tolist() == pytest.approx([want, 0.0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    rot, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert km.linear_cka(x, x) == pytest.approx(1.0)
    assert km.linear_cka(x, 3 * x @ rot + 5) == pytest.approx(1.0)  # invariant to rotation, scale, shift
    assert km.linear_cka(x, torch.randn(200, 16, generator=g)) < 0.2
    assert km.log_minmax([1e-3, 1e-2, 1e-1]) == pytest.approx([0.0, 0.5, 1.0], abs=1e-6)
    assert km.log_minmax([2.0, 2.0]) == [0.0, 0.0]


def test_svd_geometry_separates_rotation_from_scaling():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g, dtype=torch.float64)
    same = km.svd_geometry(w, w.clone(), r=8)
    assert same["scale_spread"] == pytest.approx(0, abs=1e-9) and same["rot_u"] == pytest.approx(0, abs=1e-9)
    double = km.svd_geometry(w, 2 * w, r=8)
    assert double["scale_mean"] == pytest.approx(2) and double["scale_spread"] == pytest.approx(0, abs=1e-9)
    assert double["rot_u"] == pytest.approx(0, abs=1e-9)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    rotated = km.svd_geometry(w, q @ w, r=8)  # left rotation: same spectrum, new left subspace
    assert rotated["scale_spread"] == pytest.approx(0, abs=1e-9) and rotated["rot_u"] > 0.5
    assert rotated["rot_v"] == pytest.approx(0, abs=1e-9)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    c = torch.linspace(0.5, 2.0, s.numel(), dtype=torch.float64)
    aniso = km.svd_geometry(w, u @ torch.diag(s * c) @ vh, r=4)  # same subspaces, index-dependent scaling
    ratio = torch.sort(s * c, descending=True).values / s
    assert aniso["scale_spread"] == pytest.approx(float(ratio.log().std()), rel=1e-6)
    assert aniso["scale_spread"] > 0.3


# ---- runner, CLI and report ----------------------------------------------------------------------
def _small_graph(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "geo.kg").write_text(
        "@domain geo\n@type country root\n@type city intermediate\n@type continent root\n"
        "@relation capital | capital | country -> city | The capital of {} is\n"
        "@relation continent | continent | city -> continent | {} is a city in\n"
        "capital: France = Paris; Italy = Rome; Spain = Madrid; Japan = Tokyo; Egypt = Cairo; Peru = Lima\n"
        "continent: Paris = Europe; Rome = Europe; Madrid = Europe; Tokyo = Asia; Cairo = Africa; Lima = South America\n"
        "@nodes continent: Oceania\n"
    )
    return build_curated(src)


def test_run_kg_on_a_tiny_model_restores_weights_and_reuses_before(tmp_path):
    from loka.eval.kg_runner import run_kg

    g = _small_graph(tmp_path)
    h = loka.load_model("tiny-llama")
    snap = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    hp = {"layers": [0, 1], "lr": 5e-2, "max_steps": 15, "linf_constraint": None}
    out = tmp_path / "run"
    s = run_kg(h, g, "ft", "root", 2, seed=0, out_dir=out, hparams=hp, progress=False, repr_n=16)
    for n, p in h.model.named_parameters():
        assert torch.equal(p, snap[n]), n
    assert (
        s["interventions"] == 2
        and s["task"] == "edit"
        and s["probes"] == len((out / "probes.jsonl").read_text().splitlines())
    )
    assert (
        0 <= s["ccr"] <= 1
        and 0 <= s["cka"] <= 1 + 1e-9
        and s["kl"] >= 0
        and len(s["cka_layers"]) == h.n_layers
    )
    assert s["geometry"] and all(0 <= v["rot_u"] <= 1 for v in s["geometry"].values())
    key = json.loads((out / "before.json").read_text())["key"]
    import loka.eval.kg_runner as kr

    calls = []
    real = kr.choose

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    kr.choose = counting
    try:  # a rerun scores the probes once (after the update): the pre-update choices come from the cache
        s2 = run_kg(h, g, "ft", "root", 2, seed=0, out_dir=out, hparams=hp, progress=False, repr_n=16)
        assert len(calls) == 1  # only the post-update pass
        calls.clear()  # a cache for other probes (another seed) is not used
        run_kg(h, g, "ft", "root", 2, seed=1, out_dir=out, hparams=hp, progress=False, repr_n=16)
        assert len(calls) == 2 and json.loads((out / "before.json").read_text())["key"] != key
    finally:
        kr.choose = real
    assert s2["ccr_near"] == s["ccr_near"] and s2["by_type"] == s["by_type"]
    with pytest.raises(loka.RequestError, match="only unlearns"):
        run_kg(h, g, "npo", "root", 1, task="edit", progress=False)
    f = run_kg(
        h,
        g,
        "npo",
        "root",
        2,
        out_dir=tmp_path / "f",
        progress=False,
        repr_n=16,
        hparams={"layers": [0], "max_steps": 3},
    )
    assert f["task"] == "forget" and f["by_type"]["direct"]["target_after"] is None
    # a memory-based editor: no weight changes, so no geometry, but every probe is measured through it
    m = run_kg(h, g, "grace", "root", 2, progress=False, repr_n=16, hparams={"layer": 1})
    assert m["geometry"] == {} and m["by_type"]["direct"]["target_after"] is not None
    for n, p in h.model.named_parameters():
        assert torch.equal(p, snap[n]), n


def test_kg_edit_on_smollm2_moves_the_direct_probes(smollm2):
    """A real edit flips the direct probes to the new object; the model is restored afterwards."""
    from loka.eval.kg_runner import run_kg

    g = build_curated()
    name = smollm2.weight_name(5)
    w = smollm2.param(name).detach().clone()
    s = run_kg(
        smollm2,
        g,
        "ft",
        "leaf",
        2,
        seed=1,
        progress=False,
        repr_n=32,
        domains=["biology"],
        hparams={"layers": [5], "max_steps": 25},
    )
    d = s["by_type"]["direct"]
    assert d["target_after"] >= 0.5 and d["original_after"] < d["original_before"], d
    assert torch.equal(smollm2.param(name), w)


def test_cli_build_probes_run_and_report(tmp_path, capsys):
    g = tmp_path / "g.json"
    assert cli(["kg", "build", "--curated", "--out", str(g), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["triples"] == len(build_curated().triples) and st["domains"]["history"]["triples"] >= 150
    assert (
        cli(
            [
                "kg",
                "probes",
                "--graph",
                str(g),
                "--level",
                "intermediate",
                "--scale",
                "3",
                "--out",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "3 intervention(s)" in text and "reverse" in text and "mc:" in text
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sum(x["kind"] == "intervention" for x in lines) == 3 and all("mc_prompt" in x for x in lines[3:])
    assert (
        cli(
            [
                "kg",
                "probes",
                "--graph",
                str(tmp_path / "missing.json"),
                "--level",
                "leaf",
                "--out",
                str(tmp_path / "q.jsonl"),
            ]
        )
        == 2
    )
    assert "loka kg build" in capsys.readouterr().err
    small = _small_graph(tmp_path).save(tmp_path / "small.json")
    for method, extra in (
        ("ft", ["--set", "layers=[0]", "--set", "max_steps=5"]),
        ("npo", ["--set", "layers=[0]"]),
    ):
        assert (
            cli(
                [
                    "kg",
                    "run",
                    "--model",
                    "tiny-llama",
                    "--method",
                    method,
                    "--graph",
                    str(small),
                    "--level",
                    "root",
                    "--scale",
                    "2",
                    "--out",
                    str(tmp_path / "runs" / method),
                    "--json",
                    *extra,
                ]
            )
            == 0
        )
        s = json.loads(capsys.readouterr().out)
        assert s["method"] == method and s["interventions"] == 2
    assert cli(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "<table>" in page and "CCR" in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    assert page.count("<details>") == 2 and "Per intervention" in page  # one view per run
    ivs = [json.loads(x) for x in (tmp_path / "runs" / "ft" / "interventions.jsonl").read_text().splitlines()]
    assert all(f"{iv['old']} → {iv['new']}" in page for iv in ivs)
    assert cli(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.html")]) == 2
    # one run per task: KL and CKA are still plotted (the normalised values need two runs)
    from loka.eval.kg_report import load_runs, plots

    runs = load_runs([tmp_path / "runs"])
    bare = [{k: v for k, v in r.items() if k not in ("kl", "cka")} for r in runs]
    assert plots(runs)["representation"] != plots(bare)["representation"]
    with chrome(tmp_path) as d:
        d.get((tmp_path / "r.html").as_uri())
        imgs = rendered_images(d)
        assert {i["alt"] for i in imgs} >= {"propagation", "representation"} and all(i["ok"] for i in imgs)
        assert len(d.find_elements("css selector", "table")) >= 6
        full_page_screenshot(d, tmp_path / "kg-report.png")


def test_report_normalises_per_task():
    from loka.eval.kg_report import normalise

    runs = [
        {"task": "edit", "kl": 0.01, "cka": 0.9},
        {"task": "edit", "kl": 0.1, "cka": 0.99},
        {"task": "forget", "kl": 1.0, "cka": 0.5},
        {"task": "forget", "kl": 1.0, "cka": 0.5},
    ]
    normalise(runs)
    assert [r["kl_norm"] for r in runs] == pytest.approx([0, 1, 0, 0])


def test_retain_facts_never_overlap_probed_or_intervened_facts(curated):
    from loka.bench.probes import retain_requests

    ivs, probes = generate_probes(curated, "leaf", 20, "forget", seed=2)
    keep = retain_requests(curated, ivs, probes, 60, seed=2)
    assert len(keep) == 60 and all(isinstance(r, loka.RetainRequest) for r in keep)
    asked = {curated.name_of(p.subject) for p in probes} | {curated.name_of(iv.old) for iv in ivs}
    assert not {r.subject for r in keep} & asked


def test_representation_sample_is_distinct_and_counts_its_contextual_part(curated):
    from loka.eval.kg_runner import _repr_sample

    _, probes = generate_probes(curated, "leaf", 40, "edit", seed=0)
    sample, n_ctx = _repr_sample(probes, 64)
    assert len(sample) == len(set(sample)) == 64 and n_ctx == 32
    ctx = {p.cloze for p in probes if p.type == "contextual"}
    assert all(s in ctx for s in sample[:n_ctx]) and not any(s in ctx for s in sample[n_ctx:])
