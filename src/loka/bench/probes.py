"""KnowledgeSmith probes (ICLR 2026): interventions on a knowledge graph and the
six probe types that measure how an update propagates.

An **intervention** is one triple ``(s, r, o)`` whose head sits at the requested level. Editing moves
it to a new object ``o'`` of the same type (the request's ``target_new``); unlearning makes the model
drop ``o`` (target = a neutral answer). The probes, each in ≥ 3 templated phrasings, as 4-way
multiple choice (MMLU layout, options shuffled with a fixed seed) and as an open cloze prompt:

=============  ====  ==========================================================================
direct         Q+    the fact itself: "What is the {noun} of {s}?"
reverse        Q+    the inverse: "Which {head type} has {y} as its {noun}?" (y = o' or o)
multihop       Q+    a chain s -r-> y -r2-> x: "What is the {noun2} of the {noun} of {s}?"
comparison     Q+    statements compared: "the {noun} of {s} is y" against the old object,
                     a same-relation statement about another subject and a distractor
conflict       Q±    the direct question after a contradicting claim in context
contextual     Q−    other facts, near (sharing a node with the intervention) and far (same
                     domain, no shared node): they must not change
=============  ====  ==========================================================================

Every probe has exactly one option that is true after the update (``target``; for unlearning the
forgotten answer is ``original`` and no option is the target), and distractors are same-type nodes
that are not true answers (tests check both).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from ..errors import RequestError
from ..requests import EditRequest, ForgetRequest, RetainRequest
from .kg import ANY, LEVELS, KnowledgeGraph

PROBE_TYPES = ("direct", "reverse", "multihop", "comparison", "conflict", "contextual")
Q_PLUS = ("direct", "reverse", "multihop", "comparison", "conflict")
LETTERS = "ABCD"

_DIRECT_Q = ("What is the {noun} of {s}?", "Which {tt} is the {noun} of {s}?", "Name the {noun} of {s}.")
_DIRECT_C = ("{rel}", "The {noun} of {s} is", "{s}'s {noun} is")
_REVERSE_Q = (
    "Which {ht} has {y} as its {noun}?",
    "{Y} is the {noun} of which {ht}?",
    "Of which {ht} is {y} the {noun}?",
)
_REVERSE_C = ("{Y} is the {noun} of", "The {ht} whose {noun} is {y} is", "One {ht} with {y} as its {noun} is")
_MULTI_Q = (
    "What is the {noun2} of the {noun} of {s}?",
    "Consider the {noun} of {s}. What is its {noun2}?",
    "Which {tt2} is the {noun2} of {s}'s {noun}?",
)
_MULTI_C = (
    "The {noun2} of the {noun} of {s} is",
    "Take the {noun} of {s}: its {noun2} is",
    "{S}'s {noun} has as its {noun2}",
)
_COMP_Q = (
    "Which statement is true?",
    "Which of the following is correct?",
    "Which of these claims is accurate?",
)
_COMP_C = ("True statement:", "A correct fact:", "It is accurate that")
_CONF_Q = (
    "Some sources claim that the {noun} of {s} is {c}. What is the {noun} of {s}?",
    "A student wrote that the {noun} of {s} is {c}. Which {tt} is really the {noun} of {s}?",
    "Ignore the rumour that the {noun} of {s} is {c}. Name the {noun} of {s}.",
)
_CONF_C = (
    "Some sources claim that the {noun} of {s} is {c}. In fact, the {noun} of {s} is",
    "A student wrote that the {noun} of {s} is {c}. The correct {noun} of {s} is",
    "Despite the rumour that {s}'s {noun} is {c}, {s}'s {noun} is",
)


def _cap(x: str) -> str:
    return x[:1].upper() + x[1:]


def neutral_answer(tail_type: str) -> str:
    """The neutral target of an unlearning intervention: the object's type, no entity ("a continent")."""
    w = _type_word(tail_type)
    return "something" if w == "one" else ("an " if w[0] in "aeiou" else "a ") + w


def _type_word(t: str) -> str:
    return "one" if t == ANY or t.endswith(" object") or t == "entity" else t


@dataclass
class Intervention:
    """One update: ``(head, relation, old)`` becomes ``(head, relation, new)`` (edit) or is forgotten."""

    index: int
    head: str
    relation: str
    old: str
    new: str | None
    task: str  # "edit" | "forget"
    level: str
    domain: str

    def request(self, g: KnowledgeGraph, paraphrases: int = 2) -> EditRequest:
        """The unified request (KnowledgeSmith §3.1): target = the new object (edit) or the forgotten
        object with no replacement (forget); paraphrases are the other direct cloze phrasings."""
        r, s = g.relations[self.relation], g.name_of(self.head)
        para = [_fill(t, g, self)[0] for t in _DIRECT_C[1 : 1 + paraphrases]]
        if self.task == "edit":
            return EditRequest(
                r.cloze,
                s,
                g.name_of(self.new),
                g.name_of(self.old),
                paraphrases=para,
                case_id=f"kg-{self.index}",
                relation_id=self.relation,
            )
        return ForgetRequest(
            r.cloze,
            s,
            target_true=g.name_of(self.old),
            target_new=neutral_answer(r.tail_type),
            paraphrases=para,
            case_id=f"kg-{self.index}",
            relation_id=self.relation,
        )


@dataclass
class Probe:
    """One probe: a question with four options and a cloze prompt the options complete."""

    id: str
    intervention: int
    type: str
    phrasing: int
    question: str
    cloze: str
    options: list[str]
    target: int | None  # option that is true after the update (None: unlearning's Q+ probes)
    original: int | None  # option that was true before (None: no option was)
    level: str
    domain: str
    relation: str
    scope: str = ""  # contextual: "near" | "far"
    claims: list[str] = field(
        default_factory=list
    )  # per option, the object it asserts for the intervention's (s, r)
    subject: str = ""  # node id the probe asks about (the intervened subject, or a contextual fact's head)

    @property
    def family(self) -> str:
        return "Q-" if self.type == "contextual" else "Q+"

    def mc_prompt(self) -> str:
        """MMLU layout; the answer is the letter token after "Answer:"."""
        opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options))
        return f"{self.question}\n{opts}\nAnswer:"

    def to_dict(self) -> dict:
        return asdict(self)


def _fill(template: str, g: KnowledgeGraph, iv: Intervention, **kw) -> tuple[str, dict]:
    r = g.relations[iv.relation]
    s = g.name_of(iv.head)
    vals = {
        "noun": r.noun,
        "s": s,
        "S": _cap(s),
        "tt": _type_word(r.tail_type),
        "ht": _type_word(r.head_type),
        "rel": r.prompt(s),
        **kw,
    }
    if "y" in vals:
        vals["Y"] = _cap(vals["y"])
    return _cap(template.format(**vals)), vals


def _options(
    rng: random.Random, correct: list[str], pool: list[str], exclude: set[str], n: int = 4
) -> list[str] | None:
    """``correct`` first-listed ids plus same-type distractors not in ``exclude``, shuffled; None if short."""
    cand = [x for x in pool if x not in exclude and x not in correct]
    need = n - len(correct)
    if len(cand) < need:
        return None
    opts = list(correct) + rng.sample(cand, need)
    rng.shuffle(opts)
    return opts


def candidate_triples(g: KnowledgeGraph, level: str, task: str, domains: list[str] | None = None):
    """Triples that can be intervened on at ``level``: enough same-type objects for 4 options and,
    for editing, a new object that is not already true."""
    if level not in LEVELS:
        raise RequestError(f"level must be one of {LEVELS} (got {level!r})")
    out = []
    for t in g.triples:
        h = g.nodes[t.head]
        if h.level != level or (domains and h.domain not in domains):
            continue
        pool = g.pool(t.relation, "tail")
        free = [x for x in pool if x not in g.tails(t.head, t.relation)]
        if len(free) < 3:  # edit: the new object and two distractors; forget: three distractors
            continue
        out.append(t)
    return out


def make_interventions(
    g: KnowledgeGraph,
    level: str,
    k: int,
    task: str = "edit",
    seed: int = 0,
    domains: list[str] | None = None,
    prefer: dict | set | None = None,
) -> list[Intervention]:
    """``k`` interventions at ``level``, one per subject, spread evenly over the domains (seeded).
    Triples in ``prefer`` (e.g. the facts the model knows, :func:`loka.eval.kg_runner.known_triples`)
    are taken first in each domain; when ``prefer`` maps a triple to objects, an edit's new object is
    drawn from those.

    For an edit the new object is drawn among same-type objects that are not true for the subject,
    preferring one whose own facts differ from the old object's (so multi-hop probes can tell them apart)."""
    if task not in ("edit", "forget"):
        raise RequestError(f"task must be 'edit' or 'forget' (got {task!r})")
    if k < 1:
        raise RequestError(f"scale must be ≥ 1 (got {k})")
    unknown = sorted(set(domains or ()) - set(g.domains()))
    if unknown:
        raise RequestError(f"unknown domain(s) {unknown}; the graph has {g.domains()}")
    rng = random.Random(seed)
    cands = candidate_triples(g, level, task, domains)
    by_dom: dict[str, list] = {}
    for t in cands:
        by_dom.setdefault(g.nodes[t.head].domain, []).append(t)
    for lst in by_dom.values():
        rng.shuffle(lst)
        if prefer:
            lst.sort(key=lambda t: t not in prefer)  # stable: preferred first, each part still shuffled
    heads_avail = len({t.head for t in cands})
    if k > heads_avail:
        raise RequestError(
            f"scale {k} asks for more interventions than the graph has subjects at level "
            f"{level!r} ({heads_avail}); use a smaller --scale or a larger graph (--graph derived)"
        )
    chosen, used = [], set()
    doms = sorted(by_dom)
    while len(chosen) < k:
        before = len(chosen)
        for d in doms:
            while by_dom[d] and by_dom[d][0].head in used:
                by_dom[d].pop(0)
            if by_dom[d] and len(chosen) < k:
                t = by_dom[d].pop(0)
                used.add(t.head)
                chosen.append(t)
        if len(chosen) == before:  # cannot happen (k ≤ distinct subjects), but never spin
            break
    out = []
    for i, t in enumerate(chosen):
        new = None
        if task == "edit":
            free = [x for x in g.pool(t.relation, "tail") if x not in g.tails(t.head, t.relation)]
            if isinstance(prefer, dict) and prefer.get(t):
                free = list(prefer[t])
            rng.shuffle(free)
            old_facts = {(r2, tuple(g.tails(t.tail, r2))) for r2 in g.relations_of(t.tail)}

            def differs(x, old_facts=old_facts):
                return any(g.tails(x, r2) and tuple(g.tails(x, r2)) != tl for r2, tl in old_facts)

            new = next((x for x in free if differs(x)), free[0])
        n = g.nodes[t.head]
        out.append(Intervention(i, t.head, t.relation, t.tail, new, task, n.level, n.domain))
    return out


def _probe(
    pid, iv, typ, ph, q, c, opts_ids, g, target_id, original_id, claims=None, rel=None, scope="", labels=None
) -> Probe:
    names = labels or [g.name_of(x) for x in opts_ids]
    return Probe(
        pid,
        iv.index,
        typ,
        ph,
        q,
        c,
        names,
        opts_ids.index(target_id) if target_id in opts_ids else None,
        opts_ids.index(original_id) if original_id in opts_ids else None,
        iv.level,
        iv.domain,
        rel or iv.relation,
        scope,
        claims or [],
        iv.head,
    )


def probes_for(
    g: KnowledgeGraph,
    iv: Intervention,
    rng: random.Random,
    phrasings: int = 3,
    n_context: int = 6,
    avoid: set[str] | None = None,
) -> list[Probe]:
    """All probes of one intervention (``phrasings`` of each Q+ type; ``n_context`` contextual probes,
    half near, half far). ``avoid``: heads of other interventions (their facts are not contextual)."""
    avoid = avoid or set()
    r, s = iv.relation, iv.head
    edit = iv.task == "edit"
    y = iv.new if edit else iv.old
    truth = set(g.tails(s, r))
    pool = g.pool(r, "tail")
    out: list[Probe] = []
    pfx = f"{iv.index}"
    phs = range(min(phrasings, 3))
    # direct + conflict share the option set: the new (edit) and the old object, two distractors
    direct = _options(rng, [iv.new, iv.old] if edit else [iv.old], pool, truth | {y})
    if direct is None:
        return out
    tgt = iv.new if edit else None
    for ph in phs:
        q, _ = _fill(_DIRECT_Q[ph], g, iv)
        c, _ = _fill(_DIRECT_C[ph], g, iv)
        out.append(
            _probe(f"{pfx}-direct-{ph}", iv, "direct", ph, q, c, direct, g, tgt, iv.old, claims=list(direct))
        )
    contra = iv.old if edit else rng.choice([x for x in direct if x != iv.old])
    for ph in phs:
        q, _ = _fill(_CONF_Q[ph], g, iv, c=g.name_of(contra))
        c, _ = _fill(_CONF_C[ph], g, iv, c=g.name_of(contra))
        out.append(
            _probe(
                f"{pfx}-conflict-{ph}", iv, "conflict", ph, q, c, direct, g, tgt, iv.old, claims=list(direct)
            )
        )
    # reverse: which subject has y?
    has_y = set(g.heads(r, y)) - {s}
    rev = _options(rng, [s], g.role[(r, "head")], has_y)  # subjects with a known, different value
    if rev is not None:
        for ph in phs:
            q, _ = _fill(_REVERSE_Q[ph], g, iv, y=g.name_of(y))
            c, _ = _fill(_REVERSE_C[ph], g, iv, y=g.name_of(y))
            claims = [y if x == s else f"not:{y}" for x in rev]
            out.append(
                _probe(
                    f"{pfx}-reverse-{ph}",
                    iv,
                    "reverse",
                    ph,
                    q,
                    c,
                    rev,
                    g,
                    s if edit else None,
                    None if edit else s,
                    claims=claims,
                )
            )
    # multi-hop: y -r2-> x
    for r2 in g.relations_of(y):
        if len(g.tails(y, r2)) != 1:
            continue
        x_new = g.tails(y, r2)[0]
        x_old = g.tails(iv.old, r2)[0] if edit and len(g.tails(iv.old, r2)) == 1 else None
        if edit and (x_old is None or x_old == x_new):
            continue
        correct = [x_new, x_old] if edit else [x_new]
        excl = set(g.tails(y, r2)) | set(g.tails(iv.old, r2))
        mh = _options(rng, correct, g.pool(r2, "tail"), excl)
        if mh is None:
            continue
        r2d = g.relations[r2]
        for ph in phs:
            kw = {"noun2": r2d.noun, "tt2": _type_word(r2d.tail_type)}
            q, _ = _fill(_MULTI_Q[ph], g, iv, **kw)
            c, _ = _fill(_MULTI_C[ph], g, iv, **kw)
            out.append(
                _probe(
                    f"{pfx}-multihop-{ph}",
                    iv,
                    "multihop",
                    ph,
                    q,
                    c,
                    mh,
                    g,
                    x_new if edit else None,
                    x_old if edit else x_new,
                    rel=f"{r}>{r2}",
                )
            )
        break
    # comparison: statements; one true after the update
    noun = g.relations[r].noun
    others = [h for h in g.role[(r, "head")] if h != s and y not in g.tails(h, r) and h not in avoid]
    dist = [x for x in direct if x not in (iv.new, iv.old)]
    if others and dist:
        s2 = rng.choice(others)
        # edit: new, old, a distractor and the new object given to another subject;
        # forget: old, two distractors and the old object given to another subject (dist has 3 then)
        pairs = [(s, y), (s2, y), (s, dist[0]), (s, iv.old) if edit else (s, dist[1])]
        rng.shuffle(pairs)
        labels = [f"the {noun} of {g.name_of(a)} is {g.name_of(b)}" for a, b in pairs]
        ids = [f"{a}|{b}" for a, b in pairs]
        claims = [b if a == s else "" for a, b in pairs]
        for ph in phs:
            stmts = [_cap(x) + "." for x in labels] if ph < 2 else [x + "." for x in labels]
            out.append(
                _probe(
                    f"{pfx}-comparison-{ph}",
                    iv,
                    "comparison",
                    ph,
                    _COMP_Q[ph],
                    _COMP_C[ph],
                    ids,
                    g,
                    f"{s}|{y}" if edit else None,
                    f"{s}|{iv.old}",
                    claims=claims,
                    labels=stmts,
                )
            )
    # contextual: near (shares a node with the intervention) then far (same domain, no shared node)
    touched = {s, iv.old, iv.new} | avoid
    near, far = [], []
    for t in g.triples:
        if t.head in avoid or (t.head == s and t.relation == r):
            continue
        if g.nodes[t.head].domain != iv.domain:
            continue
        shares = {t.head, t.tail} & {s, iv.old, iv.new}
        (near if shares else far).append(t)
    far = [t for t in far if t.head not in touched and t.tail not in touched]
    picked = rng.sample(near, min(len(near), n_context // 2))
    picked += rng.sample(far, min(len(far), n_context - len(picked)))
    for j, t in enumerate(picked):
        civ = Intervention(
            iv.index, t.head, t.relation, t.tail, None, "forget", g.nodes[t.head].level, iv.domain
        )
        opts = _options(rng, [t.tail], g.pool(t.relation, "tail"), set(g.tails(t.head, t.relation)))
        if opts is None:
            continue
        ph = j % 3
        q, _ = _fill(_DIRECT_Q[ph], g, civ)
        c, _ = _fill(_DIRECT_C[ph], g, civ)
        out.append(
            _probe(
                f"{pfx}-contextual-{j}",
                civ,
                "contextual",
                ph,
                q,
                c,
                opts,
                g,
                t.tail,
                t.tail,
                rel=t.relation,
                scope="near" if t in near else "far",
            )
        )
        out[-1].level = iv.level  # reported under the intervention's level
    return out


def generate_probes(
    g: KnowledgeGraph,
    level: str,
    k: int,
    task: str = "edit",
    seed: int = 0,
    domains: list[str] | None = None,
    phrasings: int = 3,
    n_context: int = 6,
    prefer: dict | set | None = None,
) -> tuple[list[Intervention], list[Probe]]:
    """Interventions and their probes for one run (same seed → same interventions, options, order)."""
    ivs = make_interventions(g, level, k, task, seed, domains, prefer)
    heads = {iv.head for iv in ivs}
    probes: list[Probe] = []
    for iv in ivs:
        rng = random.Random(f"{seed}-{iv.index}")
        probes.extend(probes_for(g, iv, rng, phrasings, n_context, avoid=heads - {iv.head}))
    return ivs, probes


def retain_requests(
    g: KnowledgeGraph, ivs: list[Intervention], probes: list[Probe], n: int, seed: int = 0
) -> list[RetainRequest]:
    """Facts to keep during unlearning: same-domain triples whose subject and object no intervention
    touches and whose subject no probe asks about (so the retain loss never sees a measured fact)."""
    used = {iv.head for iv in ivs} | {iv.old for iv in ivs} | {p.subject for p in probes}
    rng = random.Random(seed)
    doms = {iv.domain for iv in ivs}
    cand = [
        t for t in g.triples if g.nodes[t.head].domain in doms and t.head not in used and t.tail not in used
    ]
    rng.shuffle(cand)
    return [
        RetainRequest(
            g.relations[t.relation].cloze, g.name_of(t.head), g.name_of(t.tail), case_id=f"kg-retain-{i}"
        )
        for i, t in enumerate(cand[:n])
    ]
