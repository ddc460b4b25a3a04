"""Exported folders with memories: GRACE, WISE and MEMOIR artifacts go into a modelling file that plain
transformers loads with ``trust_remote_code=True`` in a fresh process where loka cannot be imported, and
that answers as loka does (the edited prompt as loka with the artifact applied, an unrelated prompt as
the base model, cached greedy generation token for token). LOKA's codebook and SCR's fact store are
refused with one line and nothing written; formats of weights alone keep refusing every memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import loka
from loka.cli import main
from loka.models.hooked import check_exportable
from loka.models.loader import EXPORT_MARKER

from .conftest import TINY

A = loka.EditRequest("{} was born in the city of", "Zorblax Quint", "Qx")
B = loka.EditRequest("{} works as a", "Perla Vint", "Zw")
UNRELATED = "A completely different sentence about cooking pasta."
GRACE = {"layer": 1, "eps": 0.2, "lr": 0.5, "n_iter": 60}
WISE = {"layer": 1, "lr": 0.05, "n_iter": 70}
MEMOIR = {"layer": 2, "n_iter": 30, "n_prefixes": 2, "tau": 0.9}
NEW_TOKENS = 4

#: Run in a fresh interpreter: ``-I`` (no PYTHONPATH, no working directory on the path) and loka made
#: unimportable, so the folders must work where loka is not installed. For each folder ``i``: load it with
#: plain transformers, record the logits of every ``i.ids.<name>`` row (with ``i.mask.<name>`` when given)
#: and its greedy continuation; load the first folder once more without ``trust_remote_code`` and record
#: the error; fail if any loka module was imported.
LOAD_SCRIPT = r"""
import json, sys
sys.modules["loka"] = None  # any import of loka fails
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

folders, inputs, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
data, out, info = load_file(inputs), {}, {"models": []}
for i, (folder, new_tokens) in enumerate(folders):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    info["models"].append({"class": type(model).__name__, "base": type(model).__mro__[1].__name__})
    with torch.no_grad():
        for key, ids in data.items():
            if not key.startswith(f"{i}.ids."):
                continue
            name = key.split(".", 2)[2]
            mask = data.get(f"{i}.mask.{name}", torch.ones_like(ids))
            out[f"{i}.logits.{name}"] = model(input_ids=ids, attention_mask=mask).logits.contiguous()
            if new_tokens:
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=model.config.eos_token_id)
                out[f"{i}.gen.{name}"] = gen.contiguous()
try:
    AutoModelForCausalLM.from_pretrained(folders[0][0])
    info["untrusted"] = "loaded"
except Exception as e:
    info["untrusted"] = f"{type(e).__name__}: {e}"
imported = sorted(m for m, v in sys.modules.items() if v is not None and (m == "loka" or m.startswith("loka.")))
assert not imported, imported
save_file(out, out_path)
with open(out_path + ".json", "w") as f:
    json.dump(info, f)
"""


def load_in_plain_transformers(
    tmp_path: Path, folders: list[tuple[Path, int]], inputs: dict[str, torch.Tensor]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load each folder (with its number of new tokens to generate) with
    ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` in a fresh process without
    loka: ``({"models": [{class, base}], "untrusted": what a load without trust_remote_code did},
    {i.logits.name, i.gen.name: tensor})``."""
    src, dst = tmp_path / "inputs.safetensors", tmp_path / "outputs.safetensors"
    save_file({k: v.clone().contiguous() for k, v in inputs.items()}, src)
    _run_isolated(
        tmp_path,
        [
            sys.executable,
            "-I",
            "-c",
            LOAD_SCRIPT,
            json.dumps([(str(f), n) for f, n in folders]),
            str(src),
            str(dst),
        ],
    )
    return json.loads(Path(f"{dst}.json").read_text()), load_file(dst)


def _run_isolated(tmp_path: Path, argv: list[str]) -> None:
    """Run ``argv`` (``python -I -c SCRIPT ...``) offline, with no HF/transformers/Python settings of this
    process and caches under ``tmp_path``; fail with its stderr unless it exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PYTHON"))}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_MODULES_CACHE": str(tmp_path / "mods"),
    }
    r = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]


def _ids(h, text: str) -> torch.Tensor:
    return h.tokenizer(text, return_tensors="pt")["input_ids"]


def _outputs(h, inputs: dict[str, torch.Tensor], new_tokens: int) -> dict[str, torch.Tensor]:
    """What the in-memory loka model gives for ``inputs``: logits and greedy continuations."""
    out = {}
    with torch.no_grad():
        for key, ids in inputs.items():
            if not key.startswith("ids."):
                continue
            name = key[4:]
            mask = inputs.get("mask." + name, torch.ones_like(ids))
            out[f"logits.{name}"] = h.model(input_ids=ids, attention_mask=mask).logits
            if new_tokens:
                out[f"gen.{name}"] = h.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=h.model.config.eos_token_id,
                )
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _state(h) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in h.model.state_dict().items()}


@dataclass
class Case:
    """One exported folder: the handle it came from, its artifacts, and what loka answered before and
    after applying them; ``got`` is filled with what plain transformers answered."""

    handle: Any
    artifacts: list
    folder: Path
    inputs: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    loka: dict[str, torch.Tensor]
    new_tokens: int = NEW_TOKENS
    extra: dict = field(default_factory=dict)
    got: dict[str, torch.Tensor] = field(default_factory=dict)
    model: dict = field(default_factory=dict)


def _case(tmp_path: Path, name: str, inputs: dict, edit, new_tokens: int = NEW_TOKENS) -> Case:
    """Load ``name``, answer ``inputs``, apply ``edit(h) -> artifacts``, answer again, export."""
    h = loka.load_model(name)
    base = _outputs(h, inputs, new_tokens)
    arts = edit(h)
    after = _outputs(h, inputs, new_tokens)
    weights = _state(h)
    hooks = {n: dict(m._forward_hooks) for n, m in h.model.named_modules() if m._forward_hooks}
    folder = h.save_pretrained(tmp_path / f"{name}-{'-'.join(a.method for a in arts)}")
    unchanged = _state(h).keys() == weights.keys() and all(
        torch.equal(v, weights[k]) for k, v in _state(h).items()
    )
    same_hooks = hooks == {n: dict(m._forward_hooks) for n, m in h.model.named_modules() if m._forward_hooks}
    return Case(
        h, arts, folder, inputs, base, after, new_tokens, {"unchanged": unchanged, "same_hooks": same_hooks}
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Case]:
    """Every folder of this module, exported once and loaded in ONE fresh process (a process start and
    transformers' import cost seconds)."""
    tmp = tmp_path_factory.mktemp("remote")
    h = loka.load_model("tiny-llama")  # every tiny model has this byte-level tokenizer
    batch = h.tokenizer([A.text, B.text, UNRELATED], return_tensors="pt", padding=True, padding_side="left")
    one = {"ids.a": _ids(h, A.text), "ids.b": _ids(h, B.text), "ids.other": _ids(h, UNRELATED)}
    state = loka.EditState()  # the memoir case: two sequential batches, one memory
    cases = {
        "grace": _case(tmp, "tiny-llama", one, lambda h: [loka.edit(h, [A], "grace", GRACE, progress=False)]),
        "wise": _case(tmp, "tiny-gpt2", one, lambda h: [loka.edit(h, [B], "wise", WISE, progress=False)]),
        "memoir": _case(
            tmp,
            "tiny-llama",
            {**one, "ids.batch": batch["input_ids"], "mask.batch": batch["attention_mask"]},
            lambda h: [loka.edit(h, [r], "memoir", MEMOIR, progress=False, state=state) for r in (A, B)],
        ),
    }
    for name in TINY:  # GRACE then WISE on one module, MEMOIR on another, a weight edit in the weights
        cases[name] = _case(
            tmp,
            name,
            one,
            lambda h: [
                loka.edit(h, [A], "grace", GRACE, progress=False),
                loka.edit(h, [B], "wise", WISE, progress=False),
                loka.edit(h, [A], "memoir", MEMOIR, progress=False),
                loka.edit(
                    h, [B], "rome", {"layer": 0, "v_steps": 5, "mom2_adjustment": False}, progress=False
                ),
            ],
            new_tokens=0,
        )
    names = list(cases)
    inputs = {f"{i}.{k}": v for i, n in enumerate(names) for k, v in cases[n].inputs.items()}
    info, got = load_in_plain_transformers(
        tmp, [(cases[n].folder, cases[n].new_tokens) for n in names], inputs
    )
    for i, n in enumerate(names):
        cases[n].got = {k.split(".", 1)[1]: v for k, v in got.items() if k.split(".", 1)[0] == str(i)}
        cases[n].model = info["models"][i]
    cases["grace"].extra["untrusted"] = info["untrusted"]
    return cases


def _answer(case: Case, name: str) -> str:
    h, n = case.handle, case.inputs[f"ids.{name}"].shape[1]
    return h.tokenizer.decode(case.got[f"gen.{name}"][0, n:])


def test_grace_folder_answers_as_loka_without_loka(exported):
    c = exported["grace"]
    (art,) = c.artifacts
    assert not _close(c.loka["logits.a"], c.base["logits.a"])  # the codebook answers on its prompt
    assert c.extra["unchanged"] and c.extra["same_hooks"]  # the in-memory model keeps its weights and memory
    marker = json.loads((c.folder / EXPORT_MARKER).read_text())
    assert marker["remote_code"]["hooks"] == [
        {"kind": "grace", "module": c.handle.spec.mlp_out_path(1), "artifacts": [art.id]}
    ]
    config = json.loads((c.folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_loka.LokaForCausalLM"
    assert config["model_type"] == "loka_llama" and config["loka_memory"]["hooks"][0]["kind"] == "grace"
    source = (c.folder / "modeling_loka.py").read_text()
    imports = {
        ln.split()[1].split(".")[0] for ln in source.splitlines() if ln.startswith(("import ", "from "))
    }
    assert imports <= {"__future__", "torch", "transformers"}, imports

    assert c.model == {"class": "LokaForCausalLM", "base": "LlamaForCausalLM"}
    assert _close(c.got["logits.a"], c.loka["logits.a"])  # as loka with the artifact applied
    assert torch.equal(c.got["gen.a"], c.loka["gen.a"]) and _answer(c, "a").startswith(" Qx")
    for name in ("b", "other"):  # outside every ball: the base model
        assert _close(c.got[f"logits.{name}"], c.base[f"logits.{name}"]), name
        assert torch.equal(c.got[f"gen.{name}"], c.base[f"gen.{name}"]), name


def test_a_load_without_trust_remote_code_fails_instead_of_answering_as_the_base_model(exported):
    assert "trust_remote_code=True" in exported["grace"].extra["untrusted"]


def test_wise_folder_answers_as_loka_without_loka(exported):
    c = exported["wise"]
    assert c.model["base"] == "GPT2LMHeadModel"
    assert not _close(c.loka["logits.b"], c.base["logits.b"])
    assert _close(c.got["logits.b"], c.loka["logits.b"]) and torch.equal(c.got["gen.b"], c.loka["gen.b"])
    assert _answer(c, "b").startswith(" Zw")
    for name in ("a", "other"):
        assert _close(c.got[f"logits.{name}"], c.loka[f"logits.{name}"]), name
        assert torch.equal(c.got[f"gen.{name}"], c.loka[f"gen.{name}"]), name
    # the unrelated prompt's activation gap stays below τ: the base model
    assert _close(c.got["logits.other"], c.base["logits.other"])


def test_memoir_folder_retrieves_and_generates_as_loka_without_loka(exported):
    """Two sequential MEMOIR artifacts (one memory): each edit's prompt retrieves its mask, also as a row
    of a left-padded batch (from its real tokens), cached greedy generation keeps the prefill's mask, and
    an unrelated prompt retrieves nothing."""
    c = exported["memoir"]
    hooks = json.loads((c.folder / EXPORT_MARKER).read_text())["remote_code"]["hooks"]
    assert hooks == [
        {"kind": "memoir", "module": c.handle.spec.mlp_out_path(2), "artifacts": [a.id for a in c.artifacts]}
    ]
    for name, req in (("a", A), ("b", B)):
        assert not _close(c.loka[f"logits.{name}"], c.base[f"logits.{name}"])
        assert _answer(c, name).startswith(" " + req.target_new)
    assert _close(c.loka["logits.other"], c.base["logits.other"])  # nothing retrieved: the base model
    assert not _close(c.loka["logits.batch"], c.base["logits.batch"])
    for name in ("a", "b", "other", "batch"):
        assert _close(c.got[f"logits.{name}"], c.loka[f"logits.{name}"]), name
        assert torch.equal(c.got[f"gen.{name}"], c.loka[f"gen.{name}"]), name


@pytest.mark.parametrize("name", TINY)
def test_every_family_carries_stacked_memories_in_loka_order(exported, name):
    """GRACE then WISE on one module (the file installs them in loka's order, so they compose the same),
    MEMOIR on another, and a ROME edit folded into the weights."""
    c = exported[name]
    assert c.artifacts[-1].kind == "weight-delta"
    kinds = [x["kind"] for x in json.loads((c.folder / EXPORT_MARKER).read_text())["remote_code"]["hooks"]]
    assert kinds == ["grace", "wise", "memoir"]
    assert c.model["class"] == "LokaForCausalLM" and c.model["base"] == type(c.handle.model).__name__
    assert c.got.keys() == c.loka.keys()
    for key in c.got:
        assert _close(c.got[key], c.loka[key]), key


def test_the_export_logs_how_to_load_it_and_loka_refuses_to_load_it_as_weights(tmp_path, caplog, capsys):
    h = loka.load_model("tiny-llama")
    art = loka.edit(h, [A], "grace", {**GRACE, "n_iter": 2}, progress=False)
    with caplog.at_level("INFO", logger="loka"):
        out = h.save_pretrained(tmp_path / "g")
    lines = [r.getMessage() for r in caplog.records if "trust_remote_code=True" in r.getMessage()]
    assert len(lines) == 1 and str(out) in lines[0]
    with pytest.raises(loka.ModelError, match=f"{art.id}.*modeling_loka.py.*trust_remote_code=True") as e:
        loka.load_model(str(out))  # as weights alone it would answer as the base model
    assert "\n" not in str(e.value)
    code, _, err = _cli(capsys, "generate", "--model", out, "--max-new-tokens", "1", A.text)
    assert code == 2 and err.count("\n") == 1 and "modeling_loka.py" in err


def _refusal(tmp_path, h, art, capsys) -> str:
    with pytest.raises(loka.ArtifactError) as e:
        h.save_pretrained(tmp_path / "py")
    assert not (tmp_path / "py").exists()
    msg = str(e.value)
    assert (
        "\n" not in msg
        and msg.startswith("cannot export: ")
        and f"{art.id} ({art.method}, kind {art.kind})" in msg
    )
    art.save(tmp_path / "a.loka")
    code, _, err = _cli(
        capsys,
        "apply",
        "--model",
        "tiny-llama",
        "--artifact",
        str(tmp_path / "a.loka"),
        "--out",
        str(tmp_path / "cli"),
    )
    assert code == 2 and err.count("\n") == 1 and art.id in err
    assert not (tmp_path / "cli").exists()
    return msg


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_loka_codebook_is_refused_naming_its_router(tmp_path, capsys):
    h = loka.load_model("tiny-llama")
    art = loka.update(
        h,
        [A],
        [],
        [],
        method="loka",
        hparams={"layer": 1, "lr": 0.05, "n_iter": 40, "router_epochs": 10},
        progress=False,
    )
    msg = _refusal(tmp_path, h, art, capsys)
    assert "router" in msg and "MiniLM" in msg


def test_scr_store_is_refused_naming_its_prompt_rewriting(tmp_path, capsys):
    h = loka.load_model("tiny-llama")
    art = loka.edit(h, [A], "scr", {"filter": "none"}, progress=False)
    msg = _refusal(tmp_path, h, art, capsys)
    assert "rewrites each prompt" in msg


def test_one_refused_artifact_refuses_the_export_of_the_others(tmp_path):
    h = loka.load_model("tiny-llama")
    grace = loka.edit(h, [A], "grace", {**GRACE, "n_iter": 2}, progress=False)
    scr = loka.edit(h, [B], "scr", {"filter": "none"}, progress=False)
    with pytest.raises(loka.ArtifactError, match=f"{scr.id} \\(scr, kind context\\)") as e:
        h.save_pretrained(tmp_path / "both")
    assert grace.id not in str(e.value) and not (tmp_path / "both").exists()


def test_formats_of_weights_alone_still_refuse_every_memory():
    h = loka.load_model("tiny-llama")
    check_exportable(h.model)  # nothing hooked: fine
    art = loka.edit(h, [A], "grace", {**GRACE, "n_iter": 2}, progress=False)
    with pytest.raises(loka.ArtifactError, match=f"cannot export: {art.id} \\(grace, kind memory\\)"):
        check_exportable(h.model)
    art.revert(h)
    check_exportable(h.model)


#: The user's view: tokenizer and model from the folder with plain transformers, a greedy answer.
ANSWER_SCRIPT = r"""
import sys
sys.modules["loka"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, out = sys.argv[1], sys.argv[2], sys.argv[3]
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = tok(prompt, return_tensors="pt").input_ids
seq = model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=3, do_sample=False)
with open(out, "w", encoding="utf-8") as f:
    f.write(tok.decode(seq[0, ids.shape[1]:]))
"""


@pytest.mark.slow
def test_smollm2_grace_folder_answers_the_edit_in_plain_transformers_and_loka_is_refused(smollm2, tmp_path):
    h = smollm2
    req = loka.EditRequest("{} is located in the city of", "Eiffel Tower", "Rome", target_true="Paris")
    art = loka.edit(h, req, "grace", progress=False)
    try:
        out = h.save_pretrained(tmp_path / "smollm2-grace")
    finally:
        art.revert(h)
    _run_isolated(
        tmp_path,
        [sys.executable, "-I", "-c", ANSWER_SCRIPT, str(out), req.text, str(tmp_path / "answer.txt")],
    )
    assert (tmp_path / "answer.txt").read_text(encoding="utf-8").startswith(" Rome")

    codebook = loka.update(
        h, [req], [], [], method="loka", hparams={"n_iter": 5, "router_epochs": 2}, progress=False
    )
    try:
        with pytest.raises(
            loka.ArtifactError,
            match=f"cannot export: {codebook.id} \\(loka, kind memory\\) because its router",
        ):
            h.save_pretrained(tmp_path / "smollm2-loka")
    finally:
        codebook.revert(h)
    assert not (tmp_path / "smollm2-loka").exists()
