"""Knowledge graphs for KnowledgeSmith-style propagation probes (ICLR 2026).

A graph is typed triples plus, per node, a domain and a level: ``root`` (a domain-level concept),
``intermediate`` (a sub-topic) or ``leaf`` (a specific entity). Each relation carries what the probe
generator needs to phrase it: a ``noun`` ("the {noun} of {subject}"), the head and tail types (the
pools distractors are drawn from; ``"*"`` = whatever fills that slot of the relation) and a cloze
prompt with ``{}`` for the subject (the edit/forget prompt).

Files: JSON (:meth:`KnowledgeGraph.to_dict`) or CSV triples
(``head,relation,tail,domain,head_type,tail_type,head_level,tail_level[,noun,cloze]``).
Two builds ship with loka (``loka kg build``):

- **curated**: the four domains of the seed (biology, economics, history, physics), written by hand
  as ``loka/data/kg/src/*.kg`` (a compact text format, see ``loka/data/kg/README.md``);
- **derived**: ``known_1000.json`` facts and MQuAKE-hard chains (Wikidata triples with labels).
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError, RequestError
from ..resources import data_dir
from ..utils.io import atomic_write_json, check_regular, parse_json, read_json, read_regular, read_text

MAX_GRAPH_BYTES = 1024 * 1024 * 1024

LEVELS = ("root", "intermediate", "leaf")
ANY = "*"
DATA = data_dir()  # the package data (loka/data)


class KGError(RequestError):
    """A malformed knowledge graph (names the file, the record and the field)."""


@dataclass(frozen=True)
class Relation:
    name: str
    noun: str
    head_type: str
    tail_type: str
    cloze: str  # "{}" = the subject; the object follows

    def prompt(self, subject: str) -> str:
        return self.cloze.replace("{}", subject)


@dataclass(frozen=True)
class Node:
    id: str
    name: str
    type: str
    level: str
    domain: str


@dataclass(frozen=True)
class Triple:
    head: str  # node ids
    relation: str
    tail: str


class KnowledgeGraph:
    """Typed, levelled triples with the indexes the probe generator needs."""

    def __init__(
        self,
        name: str,
        relations: dict[str, Relation],
        nodes: dict[str, Node],
        triples: list[Triple],
        where: str = "graph",
    ):
        self.name, self.relations, self.nodes, self.triples = name, relations, nodes, list(triples)
        self.where = where
        self.validate()
        self.out: dict[tuple[str, str], list[str]] = defaultdict(list)  # (head, rel) -> tails
        self.inv: dict[tuple[str, str], list[str]] = defaultdict(list)  # (rel, tail) -> heads
        self.by_type: dict[tuple[str, str], list[str]] = defaultdict(list)  # (domain, type) -> nodes
        self.role: dict[tuple[str, str], list[str]] = defaultdict(list)  # (rel, "head"|"tail") -> nodes
        for t in self.triples:
            self.out[(t.head, t.relation)].append(t.tail)
            self.inv[(t.relation, t.tail)].append(t.head)
            for slot, n in (("head", t.head), ("tail", t.tail)):
                if n not in self.role[(t.relation, slot)]:
                    self.role[(t.relation, slot)].append(n)
        for n in self.nodes.values():
            self.by_type[(n.domain, n.type)].append(n.id)
        self.rel_domain = {t.relation: self.nodes[t.head].domain for t in reversed(self.triples)}
        self._rels_of: dict[str, list[str]] = defaultdict(list)  # head -> relations it has
        for h, r in self.out:
            self._rels_of[h].append(r)

    def relations_of(self, head: str) -> list[str]:
        """The relations ``head`` has at least one fact for."""
        return self._rels_of.get(head, [])

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        w = self.where
        if not self.triples:
            raise KGError(f"{w}: no triples")
        for r in self.relations.values():
            for f in ("noun", "head_type", "tail_type"):
                if not isinstance(getattr(r, f), str) or not getattr(r, f).strip():
                    raise KGError(f"{w}: relation {r.name!r}: field '{f}' must be a non-empty string")
            if not isinstance(r.cloze, str) or r.cloze.count("{}") != 1:
                raise KGError(
                    f"{w}: relation {r.name!r}: field 'cloze' must contain '{{}}' exactly once "
                    f"where the subject goes (got {r.cloze!r})"
                )
        for n in self.nodes.values():
            if n.level not in LEVELS:
                raise KGError(f"{w}: node {n.id!r}: field 'level' must be one of {LEVELS} (got {n.level!r})")
            if not n.name.strip() or not n.type.strip() or not n.domain.strip():
                raise KGError(f"{w}: node {n.id!r}: fields 'name', 'type' and 'domain' must be non-empty")
        seen = set()
        for i, t in enumerate(self.triples):
            where = f"{w}: triple {i} {(t.head, t.relation, t.tail)}"
            if t.relation not in self.relations:
                raise KGError(
                    f"{where}: field 'relation' names no declared relation (known: {sorted(self.relations)})"
                )
            for slot in ("head", "tail"):
                nid = getattr(t, slot)
                if nid not in self.nodes:
                    raise KGError(f"{where}: field '{slot}' names no declared node {nid!r}")
                want = getattr(self.relations[t.relation], f"{slot}_type")
                if want != ANY and self.nodes[nid].type != want:
                    raise KGError(
                        f"{where}: {slot} {nid!r} has type {self.nodes[nid].type!r} but relation "
                        f"{t.relation!r} wants {want!r}"
                    )
            if t.head == t.tail:
                raise KGError(f"{where}: head and tail are the same node")
            if t in seen:
                raise KGError(f"{where}: duplicate triple")
            seen.add(t)

    # ---- queries -----------------------------------------------------------------------------
    def name_of(self, nid: str) -> str:
        return self.nodes[nid].name

    def tails(self, head: str, rel: str) -> list[str]:
        return self.out.get((head, rel), [])

    def heads(self, rel: str, tail: str) -> list[str]:
        return self.inv.get((rel, tail), [])

    def pool(self, rel: str, slot: str) -> list[str]:
        """Same-type candidates for a slot of ``rel``: the nodes of its declared type in the relation's
        domain, or for ``"*"`` every node that fills that slot of the relation somewhere in the graph."""
        t = getattr(self.relations[rel], f"{slot}_type")
        return list(self.role[(rel, slot)]) if t == ANY else list(self.by_type[(self.rel_domain[rel], t)])

    def domains(self) -> list[str]:
        return sorted({n.domain for n in self.nodes.values()})

    def stats(self) -> dict:
        """Per domain: triples, nodes per level, relations, multi-hop chains (s -r1-> o -r2-> x)."""
        out: dict[str, dict] = {}
        for d in self.domains():
            tr = [t for t in self.triples if self.nodes[t.head].domain == d]
            levels = Counter(n.level for n in self.nodes.values() if n.domain == d)
            heads_by_level = Counter(self.nodes[t.head].level for t in tr)
            chains = sum(len(self.relations_of(t.tail)) for t in tr)
            out[d] = {
                "triples": len(tr),
                "nodes": dict(levels),
                "triples_by_head_level": dict(heads_by_level),
                "relations": len({t.relation for t in tr}),
                "two_hop_chains": chains,
            }
        return out

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "loka-kg",
            "version": 1,
            "name": self.name,
            "relations": {
                k: {f: v for f, v in asdict(r).items() if f != "name"} for k, r in self.relations.items()
            },
            "nodes": [asdict(n) for n in self.nodes.values()],
            "triples": [[t.head, t.relation, t.tail] for t in self.triples],
        }

    def save(self, path: str | Path) -> Path:
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict, where: str = "graph") -> KnowledgeGraph:
        if not isinstance(d, dict) or d.get("format") != "loka-kg":
            raise KGError(
                f'{where}: not a loka knowledge graph (expected a JSON object with "format": "loka-kg"; '
                "CSV triples are read from a .csv file)"
            )
        for f in ("relations", "nodes", "triples"):
            if f not in d:
                raise KGError(f"{where}: missing field '{f}'")
        rels = {}
        for k, r in d["relations"].items():
            try:
                rels[k] = Relation(
                    name=k,
                    noun=r["noun"],
                    head_type=r["head_type"],
                    tail_type=r["tail_type"],
                    cloze=r["cloze"],
                )
            except (KeyError, TypeError) as e:
                raise KGError(f"{where}: relation {k!r}: missing field {e}") from None
        nodes = {}
        for i, n in enumerate(d["nodes"]):
            try:
                node = Node(id=n["id"], name=n["name"], type=n["type"], level=n["level"], domain=n["domain"])
            except (KeyError, TypeError) as e:
                raise KGError(
                    f"{where}: node {i}: missing field {e} (need id, name, type, level, domain)"
                ) from None
            if node.id in nodes:
                raise KGError(f"{where}: node {i}: duplicate id {node.id!r}")
            nodes[node.id] = node
        triples = []
        for i, t in enumerate(d["triples"]):
            if not (isinstance(t, list | tuple) and len(t) == 3 and all(isinstance(x, str) for x in t)):
                raise KGError(f"{where}: triple {i}: must be [head_id, relation, tail_id] (got {t!r})")
            triples.append(Triple(*t))
        return cls(d.get("name", "graph"), rels, nodes, triples, where=where)


def _csv_graph(path: Path) -> KnowledgeGraph:
    need = ["head", "relation", "tail", "domain", "head_type", "tail_type", "head_level", "tail_level"]
    rels: dict[str, Relation] = {}
    nodes: dict[str, Node] = {}
    triples: list[Triple] = []
    check_regular(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise KGError(
                f"{path}: CSV header lacks column(s) {missing}; the header must have {need} "
                "and optionally noun, cloze"
            )
        for i, row in enumerate(reader, start=2):
            r = row["relation"].strip()
            if r not in rels:
                noun = (row.get("noun") or r.replace("_", " ")).strip()
                rels[r] = Relation(
                    r,
                    noun,
                    row["head_type"].strip(),
                    row["tail_type"].strip(),
                    (row.get("cloze") or f"The {noun} of {{}} is").strip(),
                )
            for slot in ("head", "tail"):
                name = row[slot].strip()
                nid = f"{row['domain'].strip()}:{name}"
                node = Node(
                    nid,
                    name,
                    row[f"{slot}_type"].strip(),
                    row[f"{slot}_level"].strip(),
                    row["domain"].strip(),
                )
                if nid in nodes and nodes[nid] != node:
                    raise KGError(f"{path}:{i}: node {name!r} was declared before with another type or level")
                nodes[nid] = node
            triples.append(
                Triple(
                    f"{row['domain'].strip()}:{row['head'].strip()}",
                    r,
                    f"{row['domain'].strip()}:{row['tail'].strip()}",
                )
            )
    return KnowledgeGraph(path.stem, rels, nodes, triples, where=str(path))


def load_graph(path: str | Path) -> KnowledgeGraph:
    """Read a graph from JSON (loka-kg format) or CSV triples, validated."""
    p = Path(path)
    if not p.exists():
        raise KGError(f"graph file {p} does not exist; build one with `loka kg build --curated --out {p}`")
    try:
        if p.suffix.lower() == ".csv":
            return _csv_graph(p)
        d = parse_json(read_regular(p, MAX_GRAPH_BYTES), str(p))
    except InputError as e:  # one error type for every unreadable graph
        raise KGError(str(e)) from None
    return KnowledgeGraph.from_dict(d, where=str(p))


BUILTIN = ("curated", "derived", "merged")


def resolve_graph(spec: str | Path) -> KnowledgeGraph:
    """A graph file, or a built-in name: ``curated`` / ``derived`` (the shipped JSON, built from the
    sources when missing) or ``merged`` (both)."""
    if spec == "merged":
        return merge_graphs([resolve_graph("curated"), resolve_graph("derived")])
    if spec in ("curated", "derived"):
        path = DATA / "kg" / f"{spec}.json"
        if path.exists():
            return load_graph(path)
        return build_curated() if spec == "curated" else build_derived()
    return load_graph(spec)


# ---- the curated source format ----------------------------------------------------------------
_DIRECTIVE = re.compile(r"^@(\w+)\s+(.*)$")


def parse_source(
    text: str, where: str = "source"
) -> tuple[str, dict[str, Relation], dict[str, Node], list[Triple]]:
    """Parse one ``.kg`` domain file: ``@domain``, ``@type NAME LEVEL``,
    ``@relation name | noun | head_type -> tail_type | cloze``, ``@nodes TYPE: a, b``, and triple lines
    ``relation: head = tail; head = tail``. Node types come from the relations that use them."""
    domain = None
    levels: dict[str, str] = {}
    rels: dict[str, Relation] = {}
    names: dict[str, str] = {}  # node name -> type
    pairs: list[tuple[int, str, str, str]] = []
    for ln, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        at = f"{where}:{ln}"
        m = _DIRECTIVE.match(line)
        if m:
            key, rest = m.groups()
            if key == "domain":
                domain = rest.strip()
            elif key == "type":
                *tname, level = rest.split()
                if level not in LEVELS:
                    raise KGError(f"{at}: @type needs a level in {LEVELS} last (got {level!r})")
                levels[" ".join(tname)] = level
            elif key == "relation":
                parts = [p.strip() for p in rest.split("|")]
                if len(parts) != 4 or "->" not in parts[2]:
                    raise KGError(
                        f"{at}: @relation must be 'name | noun | head_type -> tail_type | cloze with {{}}'"
                    )
                ht, tt = (x.strip() for x in parts[2].split("->"))
                rels[parts[0]] = Relation(parts[0], parts[1], ht, tt, parts[3])
            elif key == "nodes":
                tname, _, items = rest.partition(":")
                for n in items.split(","):
                    if n.strip():
                        names[n.strip()] = tname.strip()
            else:
                raise KGError(f"{at}: unknown directive @{key} (use @domain, @type, @relation, @nodes)")
            continue
        rel, sep, body = line.partition(":")
        if not sep or rel.strip() not in rels:
            raise KGError(
                f"{at}: expected 'relation: head = tail; ...' with a declared relation (got {line[:60]!r})"
            )
        for item in body.split(";"):
            if not item.strip():
                continue
            if item.count("=") != 1:
                raise KGError(f"{at}: {item.strip()!r} must be 'head = tail'")
            h, t = (x.strip() for x in item.split("="))
            pairs.append((ln, rel.strip(), h, t))
    if domain is None:
        raise KGError(f"{where}: missing '@domain NAME'")
    for ln, rel, h, t in pairs:
        r = rels[rel]
        for name, typ in ((h, r.head_type), (t, r.tail_type)):
            if names.get(name, typ) != typ:
                raise KGError(
                    f"{where}:{ln}: {name!r} is a {names[name]!r} elsewhere but relation {rel!r} makes it a {typ!r}"
                )
            names[name] = typ
    nodes = {}
    for name, typ in names.items():
        if typ not in levels:
            raise KGError(f"{where}: type {typ!r} has no level; add '@type {typ} root|intermediate|leaf'")
        nodes[f"{domain}:{name}"] = Node(f"{domain}:{name}", name, typ, levels[typ], domain)
    triples = [Triple(f"{domain}:{h}", rel, f"{domain}:{t}") for _, rel, h, t in pairs]
    # relation names are shared across domains in one graph: qualify them by domain
    qual = {k: Relation(f"{domain}/{k}", r.noun, r.head_type, r.tail_type, r.cloze) for k, r in rels.items()}
    return (
        domain,
        {q.name: q for q in qual.values()},
        nodes,
        [Triple(t.head, f"{domain}/{t.relation}", t.tail) for t in triples],
    )


def build_curated(src: str | Path | None = None) -> KnowledgeGraph:
    """The hand-written graph: every ``*.kg`` file under ``loka/data/kg/src`` (one domain each)."""
    folder = Path(src) if src else DATA / "kg" / "src"
    files = sorted(folder.glob("*.kg"))
    if not files:
        raise KGError(f"no .kg files in {folder}")
    rels: dict[str, Relation] = {}
    nodes: dict[str, Node] = {}
    triples: list[Triple] = []
    for f in files:
        _, r, n, t = parse_source(read_text(f, MAX_GRAPH_BYTES), where=str(f))
        rels.update(r)
        nodes.update(n)
        triples.extend(t)
    return KnowledgeGraph("curated", rels, nodes, triples, where=str(folder))


# ---- the derived graph ------------------------------------------------------------------------
def _mquake_cloze(folder: Path) -> dict[str, str]:
    raw = json.loads((folder / "cloze_templates.json").read_text(encoding="utf-8"))
    return {k: v.replace("[X]", "{}").replace("__", "").strip() for k, v in raw.items()}


def build_derived(
    known: str | Path | None = None, mquake: str | Path | None = None, hub: int = 10
) -> KnowledgeGraph:
    """Entities, relations and chains from ``known_1000.json`` and ``MQuAKE-hard.json``.

    Nodes are keyed by their label (the two sources share Wikidata labels), relation by Wikidata id.
    Types: a node takes the type of the first relation slot it fills as an object (``"P36 object"``),
    else ``"entity"``; distractors come from the relation's own slot (types ``"*"``).
    Levels come from the structure: an entity that is the object of ≥ ``hub`` triples is a **root**
    (countries, languages, continents), one that is ever an object an **intermediate**, one that is
    only ever a subject a **leaf**. MQuAKE chains give the multi-hop paths.
    """
    from ..relations import RELATIONS

    known_p = Path(known) if known else DATA / "known_1000.json"
    mq_p = Path(mquake) if mquake else DATA / "mquake" / "MQuAKE-hard.json"
    cloze = _mquake_cloze(mq_p.parent)
    raw: list[tuple[str, str, str, str, str]] = []  # head, rel, tail, noun, cloze
    for i, rec in enumerate(read_json(known_p, MAX_GRAPH_BYTES)):
        try:
            rid, s, o, tmpl = (
                rec["relation_id"],
                rec["subject"].strip(),
                rec["attribute"].strip(),
                rec["template"],
            )
        except KeyError as e:
            raise KGError(f"{known_p}: record {i}: missing field {e}") from None
        noun = RELATIONS.get(rid, {}).get("name", rid)
        raw.append((s, rid, o, noun, tmpl))
    for case in read_json(mq_p, MAX_GRAPH_BYTES):
        orig = case.get("orig", {})
        for (_hq, rid, _tq), (h, noun, t) in zip(orig.get("triples", []), orig.get("triples_labeled", [])):
            raw.append((h.strip(), rid, t.strip(), noun, cloze.get(rid, f"The {noun} of {{}} is")))
    rels: dict[str, Relation] = {}
    indeg: Counter = Counter()
    obj_type: dict[str, str] = {}
    seen: set[tuple[str, str, str]] = set()
    triples: list[Triple] = []
    for h, rid, t, noun, tmpl in raw:
        if not h or not t or h == t or (h, rid, t) in seen:
            continue
        seen.add((h, rid, t))
        rels.setdefault(
            rid, Relation(rid, noun, ANY, ANY, tmpl if tmpl.count("{}") == 1 else f"The {noun} of {{}} is")
        )
        indeg[t] += 1
        obj_type.setdefault(t, f"{rid} object")
        triples.append(Triple(f"wikidata:{h}", rid, f"wikidata:{t}"))
    names = {x for tr in triples for x in (tr.head, tr.tail)}
    nodes = {}
    for nid in sorted(names):
        n = nid.split(":", 1)[1]
        level = "root" if indeg[n] >= hub else "intermediate" if indeg[n] else "leaf"
        nodes[nid] = Node(nid, n, obj_type.get(n, "entity"), level, "wikidata")
    return KnowledgeGraph("derived", rels, nodes, triples, where=f"{known_p} + {mq_p}")


def merge_graphs(graphs: list[KnowledgeGraph], name: str = "merged") -> KnowledgeGraph:
    """One graph holding several (node ids are domain-qualified, so they do not collide)."""
    rels: dict[str, Relation] = {}
    nodes: dict[str, Node] = {}
    triples: list[Triple] = []
    for g in graphs:
        rels.update(g.relations)
        nodes.update(g.nodes)
        triples.extend(g.triples)
    return KnowledgeGraph(name, rels, nodes, triples, where=name)
