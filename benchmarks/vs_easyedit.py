"""loka's ROME beside EasyEdit's ROME on the same inputs: time, peak memory and CounterFact scores.

    python benchmarks/vs_easyedit.py --easyedit /path/to/EasyEdit --python-easyedit /path/to/venv/bin/python

EasyEdit (https://github.com/zjunlp/EasyEdit; its PyPI package is from 2023, so use a checkout) is
imported at run time from ``--easyedit DIR``; none of its code is in this repository. It runs under
its own interpreter (``--python-easyedit``: a venv with torch, transformers, numpy, PyYAML and tqdm).

Same inputs for both tools:

* the model: loka's ``--model`` exported once as a Hugging Face folder (``handle.save_pretrained``);
  both tools load that folder.
* the layer (``--layer``, default 8) and ROME's hyperparameters: loka's config for the model
  (``v_lr``, ``v_steps``, ``v_weight_decay``, ``kl_factor``, ``clamp_norm_factor``), written into an
  EasyEdit hparams YAML (``v_num_grad_steps`` etc.; ``v_loss_layer`` = the last layer, as EasyEdit's
  own configs set it).
* the covariance ``C = E[k kᵀ]``: loka's cached second moments (``loka.stats.second_moments``, the
  config's corpus and token count), written into the file EasyEdit's ``layer_stats`` looks for,
  ``<stats_dir>/<model>/<ds>_stats/<module>_<dtype>_mom2_<n>.npz`` (keys ``mom2.mom2``,
  ``mom2.count``, ``sample_size``; count 1, so that EasyEdit's ``mom2 / count`` is ``C`` bit for bit;
  float64, so that EasyEdit inverts it in double as loka solves with it in double). EasyEdit never
  computes statistics here: its Wikipedia loader is replaced by one that fails. Both children report
  the sha256 of the ``C`` they read; the run stops if they differ.
* the 6 context templates: ``TEMPLATES`` below (``"{}"`` and one sample for each of ROME's five
  prefixes, as loka sampled them for SmolLM2 with seed 0). EasyEdit takes them through its own cache,
  ``rome_main.CONTEXT_TEMPLATES_CACHE``; loka through ``loka.methods.rome.context_templates``.
* the records: ``--n`` records of ``--data`` from ``--start`` (default: the first 20 of
  ``data/generated/cf_all_300.json``); the output lists their case ids.

Each tool runs in its own subprocess, so each peak RSS (``VmHWM`` of that child) is its own; the
records alternate between them (even records loka first, odd ones EasyEdit first). For each record a
child times the edit call alone (loka: ``loka.edit(..., "rome")``, applied; EasyEdit:
``apply_rome_to_model(..., return_orig_weights=True)``, the call ``BaseEditor.edit`` makes), scores
the edited model, then restores the original weights (loka: ``Artifact.revert``; EasyEdit: the
returned originals copied back, as ``restore_after_edit`` does) and checks that the edited matrix is
bit for bit the original again.

The scorer is one function in this script, ``score_record``, run in both children: CounterFact's
ES (P(new) > P(true) on the rewrite prompt), PS (the same, averaged over the paraphrases) and NS
(P(true) > P(new), averaged over the neighbourhood prompts), each probability the teacher-forced mean
per-token log-probability of the object after the prompt. Both children also score the unedited
model first; the two must agree (same model, same scorer).

EasyEdit is imported without ``easyeditor/__init__.py`` (which imports every method and editor and
their optional packages): the packages ``easyeditor`` and ``easyeditor.models`` are registered as
bare namespaces, and ``easyeditor.models.rome`` is imported from the checkout. Two packages ROME's
modules import but never use in this run are stubbed when absent: ``datasets`` (``layer_stats``
imports ``load_dataset``, used only to compute statistics from Wikipedia; the stub raises) and
``matplotlib.style`` (``compute_v`` imports ``context`` and never uses it).

Prints per-record times and scores, the medians, the median of the per-record time ratios, each
tool's peak RSS and ES/PS/NS, and writes ``benchmarks/results/vs_easyedit_<model>.json`` through
``_stamp.write_result`` (its provenance carries EasyEdit's commit and interpreter's packages).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: "{}" and one sample per ROME prefix ("The", "Therefore", "Because", "I", "You"), as loka's
#: ``context_templates(handle, 1, 10, seed=0)`` sampled them for SmolLM2-135M; fixed for both tools
TEMPLATES = [
    "{}",
    "The-the-key-to-be-t. {}",
    "Therefore_name = None self.name, self. {}",
    "Because-based methods, such as the linear regression,. {}",
    'I-look-like" (L-E-. {}',
    "You-the-best-to-buy-here. {}",
]

#: what EasyEdit's ROME imports at module level but never uses with a cached covariance
STUBBED = {
    "datasets": "layer_stats imports load_dataset, used only to compute statistics from Wikipedia (stub raises)",
    "matplotlib.style": "compute_v imports `context` from it and never uses it",
}

MISMATCHES = [
    "Stopping: EasyEdit stops the value search when the total loss (NLL + KL + decay) is below 0.05 and "
    "takes no Adam step on its last iteration (v_num_grad_steps=20: at most 19 steps); loka stops a "
    "request when its target NLL alone is below early_stop_loss=0.05 (at most v_steps=20 steps).",
    "Precision of u = C^-1 k*: loka solves in float64; EasyEdit inverts C in float64 (mom2_dtype "
    "float64), casts the inverse to float32 and multiplies in float32.",
    "Batching: EasyEdit runs the 6 templated prompts and the KL prompt as one right-padded batch every "
    "step; loka aligns the subjects, caches the columns before them and recomputes only what the "
    "delta changes (same loss, different floating-point order).",
    "The covariance is loka's (self-sampled corpus, loka's token count), not EasyEdit's default "
    "(100,000 Wikipedia texts): Wikipedia is not available offline and the comparison needs one C.",
    "The optimiser: EasyEdit's value search is torch's Adam with its default betas (beta1 0.9) in "
    "float32, with no setting for either; loka runs its config's (on SmolLM2 beta1 0.5 and bfloat16 "
    "products). Both take the config's v_lr.",
    "EasyEdit is called at apply_rome_to_model, not through BaseEditor.edit (which would also run "
    "EasyEdit's own pre/post evaluation and imports every method): the model and tokenizer are "
    "loaded as BaseEditor loads a Llama model (float32, pad = eos, right padding for ROME).",
]


# --------------------------------------------------------------------------- the scorer (both tools)


def _logprob(model, tok, prompt: str, target: str) -> float:
    """Teacher-forced mean per-token log-probability of ``" " + target`` after ``prompt``."""
    import torch

    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + t_ids])
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(dev)).logits[0].float()
    lp = torch.log_softmax(logits[len(p_ids) - 1 : len(p_ids) - 1 + len(t_ids)], dim=-1)
    return float(lp[torch.arange(len(t_ids)), torch.tensor(t_ids, device=lp.device)].mean())


def score_record(model, tok, rec: dict) -> dict:
    """CounterFact's ES, PS and NS of one record on ``model`` (the edited one), plus the rewrite
    prompt's log-probability margin ``log P(new) - log P(true)``."""
    rw = rec["requested_rewrite"]
    new, true = rw["target_new"]["str"], rw["target_true"]["str"]

    def margin(prompt: str) -> float:
        return _logprob(model, tok, prompt, new) - _logprob(model, tok, prompt, true)

    m_rw = margin(rw["prompt"].format(rw["subject"]))
    para = [margin(p) for p in rec.get("paraphrase_prompts", [])]
    neigh = [margin(p) for p in rec.get("neighborhood_prompts", [])]
    return {
        "es": float(m_rw > 0),
        "ps": sum(m > 0 for m in para) / len(para) if para else math.nan,
        "ns": sum(m < 0 for m in neigh) / len(neigh) if neigh else math.nan,
        "margin": m_rw,
    }


# --------------------------------------------------------------------------- children


def _vmhwm_kb(pid: int | str = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _sha(array) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


def _serve(proto, records: list[dict], edit_one, model_tok, weight) -> None:
    """The child's loop: score the unedited model, answer ``ready``, then one edit per command."""
    import torch

    model, tok = model_tok
    w0 = weight().detach().clone()
    pre = [score_record(model, tok, r) for r in records]
    _say(proto, {"op": "ready", "pre": pre, "vmhwm_kb": _vmhwm_kb()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        rec = records[cmd["i"]]
        seconds, restore = edit_one(rec)
        scores = score_record(model, tok, rec)
        restore()
        restored = bool(torch.equal(weight(), w0))
        _say(
            proto, {"op": "edited", "i": cmd["i"], "seconds": seconds, "scores": scores, "restored": restored}
        )
    _say(proto, {"op": "bye", "vmhwm_kb": _vmhwm_kb()})


def _say(proto, obj: dict) -> None:
    proto.write(json.dumps(obj) + "\n")
    proto.flush()


def child_prep(cfg: dict, proto) -> None:
    """(loka's interpreter) Export the model, read loka's ``C`` and write it where EasyEdit reads it."""
    import numpy as np

    import loka
    from loka.corpus import corpus_from_spec
    from loka.stats import second_moments

    loka.set_threads(cfg["threads"])
    folder = Path(cfg["model_dir"])
    if not (folder / "config.json").exists():
        loka.load_model(cfg["model"]).save_pretrained(folder)
    handle = loka.load_model(str(folder))
    hp = loka.default_hparams("rome", handle, {"layer": cfg["layer"]})
    layer = hp.layer
    corpus = corpus_from_spec(hp.mom2_corpus, handle, hp.mom2_n_tokens)
    C = second_moments(handle, [layer], corpus, hp.mom2_n_tokens, progress=False)[layer]
    mom2 = C.double().numpy()
    module = handle.spec.mlp_out_path(layer)
    ds = f"loka-{hp.mom2_corpus}"
    # EasyEdit's layer_stats: f"{model_name}/{ds_name}_stats/{layer_name}_{precision}_{'-'.join(to_collect)}{size_suffix}.npz"
    # with model_name = config._name_or_path's last component and size_suffix = f"_{mom2_n_samples}"
    npz = (
        Path(cfg["stats_dir"]) / folder.name / f"{ds}_stats" / f"{module}_float64_mom2_{hp.mom2_n_tokens}.npz"
    )
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        npz,
        **{
            "mom2.constructor": np.array("easyeditor.util.runningstats.SecondMoment()"),
            "mom2.count": np.array(1),
            "mom2.mom2": mom2,
            "sample_size": np.array(hp.mom2_n_tokens),
        },
    )
    n_layers = handle.n_layers
    yaml_lines = {
        "alg_name": '"ROME"',
        "model_name": json.dumps(str(folder)),
        "stats_dir": json.dumps(cfg["stats_dir"]),
        "device": '"cpu"',
        "layers": f"[{layer}]",
        "fact_token": '"subject_last"',
        "v_num_grad_steps": hp.v_steps,
        "v_lr": hp.v_lr,
        "v_loss_layer": n_layers - 1,
        "v_weight_decay": hp.v_weight_decay,
        "clamp_norm_factor": hp.clamp_norm_factor,
        "kl_factor": hp.kl_factor,
        "mom2_adjustment": "true" if hp.mom2_adjustment else "false",
        "context_template_length_params": "[[10, 5]]",  # unused: the templates cache is filled
        "rewrite_module_tmp": '"model.layers.{}.mlp.down_proj"',
        "layer_module_tmp": '"model.layers.{}"',
        "mlp_module_tmp": '"model.layers.{}.mlp"',
        "attn_module_tmp": '"model.layers.{}.self_attn"',
        "ln_f_module": '"model.norm"',
        "lm_head_module": '"lm_head"',
        "mom2_dataset": json.dumps(ds),
        "mom2_n_samples": hp.mom2_n_tokens,
        "mom2_dtype": '"float64"',
        "model_parallel": "false",
        "fp16": "false",
    }
    yaml_path = Path(cfg["yaml"])
    yaml_path.write_text("".join(f"{k}: {v}\n" for k, v in yaml_lines.items()))
    _say(
        proto,
        {
            "op": "prepared",
            "model_hash": handle.model_hash,
            "module": module,
            "n_layers": n_layers,
            "loka_hparams": hp.to_dict(),
            "covariance": {
                "file": str(npz),
                "sha256_float64": _sha(mom2),
                "shape": list(mom2.shape),
                "corpus": hp.mom2_corpus,
                "n_tokens": hp.mom2_n_tokens,
            },
            "easyedit_yaml": yaml_lines,
        },
    )


def child_loka(cfg: dict, proto) -> None:
    import loka
    from loka.corpus import corpus_from_spec
    from loka.methods import rome as loka_rome
    from loka.stats import second_moments

    loka.set_threads(cfg["threads"])
    t = time.perf_counter()
    handle = loka.load_model(cfg["model_dir"])
    load_s = time.perf_counter() - t
    hp = loka.default_hparams("rome", handle, {"layer": cfg["layer"]})
    templates = list(cfg["templates"])
    loka_rome.context_templates = lambda *a, **k: list(templates)  # the fixed list, not loka's sample
    C = second_moments(
        handle,
        [hp.layer],
        corpus_from_spec(hp.mom2_corpus, handle, hp.mom2_n_tokens),
        hp.mom2_n_tokens,
        progress=False,
    )[hp.layer]
    _say(proto, {"op": "loaded", "load_s": load_s, "c_sha256": _sha(C.double().numpy())})
    name = handle.weight_name(hp.layer)

    def edit_one(rec):
        req = loka.request_from_record(rec)
        t0 = time.perf_counter()
        art = loka.edit(handle, req, "rome", hp, progress=False)
        return time.perf_counter() - t0, lambda: art.revert(handle)

    _serve(proto, cfg["records"], edit_one, (handle.model, handle.tokenizer), lambda: handle.param(name))


def _import_easyedit(root: Path):
    """``easyeditor.models.rome`` from the checkout at ``root``, without the package ``__init__``s that
    import every method; absent import-only dependencies stubbed (``STUBBED``)."""
    sys.path.insert(0, str(root))
    for name, sub in (("easyeditor", "easyeditor"), ("easyeditor.models", "easyeditor/models")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root / sub)]
        sys.modules[name] = pkg
    stubbed = []
    try:
        import datasets  # noqa: F401
    except ImportError:

        def load_dataset(*a, **k):
            raise RuntimeError(
                "EasyEdit tried to compute statistics from a dataset: the covariance file is missing"
            )

        sys.modules["datasets"] = types.SimpleNamespace(load_dataset=load_dataset)
        stubbed.append("datasets")
    try:
        import matplotlib.style  # noqa: F401
    except ImportError:
        style = types.ModuleType("matplotlib.style")
        style.context = None
        mpl = types.ModuleType("matplotlib")
        mpl.__path__ = []
        mpl.style = style
        sys.modules["matplotlib"], sys.modules["matplotlib.style"] = mpl, style
        stubbed.append("matplotlib.style")
    from easyeditor.models.rome import rome_main

    return rome_main, stubbed


def child_easyedit(cfg: dict, proto) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(cfg["threads"])
    rome_main, stubbed = _import_easyedit(Path(cfg["easyedit"]))
    from easyeditor.models.rome.rome_hparams import ROMEHyperParams
    from easyeditor.util import nethook
    from easyeditor.util.device import copy_to_param, normalize_device
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hparams = ROMEHyperParams.from_hparams(cfg["yaml"])
    t = time.perf_counter()
    # as BaseEditor.__init__ loads a Llama-family model for ROME
    model = AutoModelForCausalLM.from_pretrained(
        hparams.model_name, torch_dtype=torch.float32, device_map=None
    )
    tok = AutoTokenizer.from_pretrained(hparams.model_name)
    tok.pad_token_id = tok.eos_token_id
    tok.padding_side = "right"
    model.to(normalize_device(hparams.device))
    load_s = time.perf_counter() - t
    rome_main.CONTEXT_TEMPLATES_CACHE = list(cfg["templates"])  # EasyEdit's own cache of its samples
    c = np.load(cfg["covariance_file"])
    c_sha = _sha(c["mom2.mom2"] / c["mom2.count"])
    _say(proto, {"op": "loaded", "load_s": load_s, "c_sha256": c_sha, "stubbed": stubbed})
    wname = f"{hparams.rewrite_module_tmp.format(hparams.layers[0])}.weight"

    def edit_one(rec):
        rw = rec["requested_rewrite"]
        request = {
            "prompt": rw["prompt"],
            "subject": rw["subject"],
            "target_new": rw["target_new"]["str"],
            "ground_truth": rw["target_true"]["str"],
        }
        t0 = time.perf_counter()
        _, weights_copy = rome_main.apply_rome_to_model(
            model, tok, [request], hparams, copy=False, return_orig_weights=True
        )
        seconds = time.perf_counter() - t0

        def restore():
            for k, v in weights_copy.items():
                copy_to_param(nethook.get_parameter(model, k), v)

        return seconds, restore

    _serve(proto, cfg["records"], edit_one, (model, tok), lambda: nethook.get_parameter(model, wname))


CHILDREN = {"prep": child_prep, "loka": child_loka, "easyedit": child_easyedit}


def child_main(kind: str, cfg_file: str) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol channel; prints go to the log
    os.dup2(2, 1)
    CHILDREN[kind](json.loads(Path(cfg_file).read_text()), proto)


# --------------------------------------------------------------------------- parent


class Child:
    def __init__(self, kind: str, python: str, cfg: dict, workdir: Path, env: dict):
        self.kind = kind
        cfg_file = workdir / f"{kind}.cfg.json"
        cfg_file.write_text(json.dumps(cfg))
        self.log = workdir / f"{kind}.log"
        with open(self.log, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--child", kind, "--config", str(cfg_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                cwd=ROOT,
            )

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise SystemExit(f"{self.kind} child ended (exit {self.proc.returncode}); its log ends:\n{tail}")
        return json.loads(line)

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def vmhwm_kb(self) -> int | None:
        return _vmhwm_kb(self.proc.pid)


def _easyedit_info(root: Path, python: str) -> dict:
    def git(*a):
        r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    code = (
        "import importlib.metadata as m, json, platform\n"
        "v = {}\n"
        "for p in ('torch', 'transformers', 'tokenizers', 'numpy', 'PyYAML', 'tqdm', 'datasets', 'matplotlib'):\n"
        "    try: v[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: v[p] = None\n"
        "print(json.dumps({'python': platform.python_version(), 'packages': v}))\n"
    )
    env = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    status = git("status", "--porcelain", "--", "easyeditor")
    return {
        "dir": str(root),
        "commit": git("rev-parse", "HEAD"),
        "commit_date": git("log", "-1", "--format=%cI"),
        "easyeditor_modified": bool(status) if status is not None else None,
        "interpreter": python,
        **json.loads(env),
    }


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _mean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--easyedit", help="a checkout of https://github.com/zjunlp/EasyEdit")
    ap.add_argument(
        "--python-easyedit",
        default=None,
        help="interpreter for EasyEdit (default: /tmp/easyedit-venv/bin/python if present, else this one)",
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--data", default="data/generated/cf_all_300.json")
    ap.add_argument("--start", type=int, default=0, help="first record of --data")
    ap.add_argument("--n", type=int, default=20, help="records, alternating loka / EasyEdit")
    ap.add_argument(
        "--threads", type=int, default=None, help="intra-op threads of each child (default: all CPUs)"
    )
    ap.add_argument(
        "--workdir", default=None, help="model export, covariance file, YAML, logs (default: a temp dir)"
    )
    ap.add_argument("--out", default=None, help="default benchmarks/results/vs_easyedit_<model>.json")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, args.config)
    if not args.easyedit:
        ap.error("--easyedit DIR (a checkout of EasyEdit) is required")

    sys.path.insert(0, str(Path(__file__).parent))
    from _stamp import stamp, write_result

    easyedit = Path(args.easyedit).resolve()
    if not (easyedit / "easyeditor" / "models" / "rome" / "rome_main.py").exists():
        raise SystemExit(f"{easyedit} is not an EasyEdit checkout (no easyeditor/models/rome/rome_main.py)")
    py_ee = args.python_easyedit or (
        "/tmp/easyedit-venv/bin/python" if Path("/tmp/easyedit-venv/bin/python").exists() else sys.executable
    )
    threads = args.threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    provenance = stamp(threads)
    provenance["easyedit"] = _easyedit_info(easyedit, py_ee)

    data_path = Path(args.data)
    all_records = json.loads((data_path if data_path.is_absolute() else ROOT / data_path).read_text())
    records = all_records[args.start : args.start + args.n]
    if len(records) < args.n:
        raise SystemExit(
            f"{args.data} has {len(all_records)} records; --start {args.start} --n {args.n} asks for more"
        )
    case_ids = [r.get("case_id") for r in records]

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vs_easyedit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "LOKA_QUIET": "1",
        "PYTHONUNBUFFERED": "1",
    }
    base = {
        "model": args.model,
        "model_dir": str(workdir / "model" / args.model),
        "layer": args.layer,
        "threads": threads,
        "stats_dir": str(workdir / "easyedit_stats"),
        "yaml": str(workdir / "rome_easyedit.yaml"),
    }
    print(f"workdir {workdir}; {len(records)} records of {args.data} from {args.start}: case ids {case_ids}")
    print(f"EasyEdit {provenance['easyedit']['commit']} under {py_ee}; {threads} threads per child")

    prep = Child("prep", sys.executable, base, workdir, env)
    prepared = prep.recv()
    prep.proc.wait()
    cov = prepared["covariance"]
    print(f"covariance {cov['shape']} ({cov['corpus']}, {cov['n_tokens']} tokens) -> {cov['file']}")
    cfg = {
        **base,
        "records": records,
        "templates": TEMPLATES,
        "covariance_file": cov["file"],
        "easyedit": str(easyedit),
    }

    tools = {}
    for kind, python in (("loka", sys.executable), ("easyedit", py_ee)):
        c = Child(kind, python, cfg, workdir, env)
        loaded = c.recv()
        if loaded["c_sha256"] != cov["sha256_float64"]:
            raise SystemExit(f"{kind} reads a different covariance than the one prepared; see {c.log}")
        ready = c.recv()
        tools[kind] = {"child": c, "loaded": loaded, "ready": ready, "rows": {}}
        print(
            f"{kind}: loaded in {loaded['load_s']:.1f}s, unedited model scored, RSS peak so far {ready['vmhwm_kb'] / 1024:.0f} MB"
        )
    pre_gap = max(
        abs(a["margin"] - b["margin"])
        for a, b in zip(tools["loka"]["ready"]["pre"], tools["easyedit"]["ready"]["pre"])
    )
    if pre_gap > 1e-3:
        raise SystemExit(
            f"the unedited model scores differently in the two children (margin gap {pre_gap:.2g})"
        )

    print("\n| # | case | edit | loka s | EasyEdit s | EE/loka | loka ES PS NS | EasyEdit ES PS NS |")
    print("|---|---|---|---|---|---|---|---|")
    per_record = []
    for i, rec in enumerate(records):
        order = ("loka", "easyedit") if i % 2 == 0 else ("easyedit", "loka")
        for kind in order:
            t = tools[kind]
            t["child"].send({"op": "edit", "i": i})
            r = t["child"].recv()
            if not r["restored"]:
                raise SystemExit(f"{kind} did not restore the original weights after record {i}")
            t["rows"][i] = {**r, "vmhwm_kb": t["child"].vmhwm_kb()}
        lo, ee = tools["loka"]["rows"][i], tools["easyedit"]["rows"][i]
        rw = rec["requested_rewrite"]
        row = {
            "i": i,
            "case_id": rec.get("case_id"),
            "edit": f"{rw['prompt'].format(rw['subject'])} -> {rw['target_new']['str']}",
            "first": order[0],
            "loka_s": lo["seconds"],
            "easyedit_s": ee["seconds"],
            "ratio_easyedit_over_loka": ee["seconds"] / lo["seconds"],
            "loka": lo["scores"],
            "easyedit": ee["scores"],
        }
        per_record.append(row)
        s = lambda d: f"{d['es']:.0f} {_fmt(d['ps'])} {_fmt(d['ns'])}"  # noqa: E731
        print(
            f"| {i} | {row['case_id']} | {row['edit'][:48]} | {lo['seconds']:.2f} | {ee['seconds']:.2f} | "
            f"{row['ratio_easyedit_over_loka']:.2f} | {s(lo['scores'])} | {s(ee['scores'])} |"
        )

    for t in tools.values():
        hwm = t["child"].vmhwm_kb()
        t["child"].send({"op": "quit"})
        bye = t["child"].recv()
        t["child"].proc.wait()
        t["peak_rss_mb"] = (hwm or bye["vmhwm_kb"]) / 1024
        t["ready_rss_mb"] = t["ready"]["vmhwm_kb"] / 1024

    def summary(kind: str) -> dict:
        rows = [r[kind] for r in per_record]
        pre = tools[kind]["ready"]["pre"]
        return {
            "median_s": statistics.median(r[f"{kind}_s"] for r in per_record),
            "mean_s": statistics.fmean(r[f"{kind}_s"] for r in per_record),
            "peak_rss_mb": round(tools[kind]["peak_rss_mb"], 1),
            "rss_peak_before_edits_mb": round(tools[kind]["ready_rss_mb"], 1),
            "load_s": tools[kind]["loaded"]["load_s"],
            "ES": _mean([r["es"] for r in rows]),
            "PS": _mean([r["ps"] for r in rows]),
            "NS": _mean([r["ns"] for r in rows]),
            "unedited": {
                "ES": _mean([r["es"] for r in pre]),
                "PS": _mean([r["ps"] for r in pre]),
                "NS": _mean([r["ns"] for r in pre]),
            },
        }

    res = {"loka": summary("loka"), "easyedit": summary("easyedit")}
    ratios = [r["ratio_easyedit_over_loka"] for r in per_record]
    res["median_time_ratio_easyedit_over_loka"] = statistics.median(ratios)
    res["ratio_of_median_times"] = res["easyedit"]["median_s"] / res["loka"]["median_s"]
    res["peak_rss_ratio_easyedit_over_loka"] = res["easyedit"]["peak_rss_mb"] / res["loka"]["peak_rss_mb"]
    res["unedited_margin_gap"] = pre_gap

    print(
        f"\nunedited model (both children, margin gap {pre_gap:.1e}): ES {res['loka']['unedited']['ES']:.2f} "
        f"PS {res['loka']['unedited']['PS']:.2f} NS {res['loka']['unedited']['NS']:.2f}"
    )
    print("| tool | median s/edit | peak RSS MB | ES | PS | NS |")
    print("|---|---|---|---|---|---|")
    for kind in ("loka", "easyedit"):
        r = res[kind]
        print(
            f"| {kind} | {r['median_s']:.2f} | {r['peak_rss_mb']:,.0f} | {r['ES']:.3f} | {r['PS']:.3f} | {r['NS']:.3f} |"
        )
    print(
        f"EasyEdit / loka: median of per-record time ratios {res['median_time_ratio_easyedit_over_loka']:.2f}x, "
        f"peak RSS {res['peak_rss_ratio_easyedit_over_loka']:.2f}x"
    )

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"vs_easyedit_{args.model}.json")
    payload = {
        "model": args.model,
        "layer": prepared["loka_hparams"]["layer"],
        "n": len(records),
        "data": args.data,
        "start": args.start,
        "case_ids": case_ids,
        "threads_per_child": threads,
        "order": "alternating per record: even records loka first, odd records EasyEdit first",
        "timed": "the edit call alone (loka.edit with apply; EasyEdit apply_rome_to_model), not load or scoring",
        "peak_rss": "VmHWM of each tool's own child process (model load, edits and scoring)",
        "templates": TEMPLATES,
        "covariance": cov,
        "loka_hparams": prepared["loka_hparams"],
        "easyedit_hparams_yaml": prepared["easyedit_yaml"],
        "easyedit_stubbed_imports": {k: STUBBED[k] for k in tools["easyedit"]["loaded"]["stubbed"]},
        "scorer": "score_record in this script: teacher-forced mean per-token log-prob of ' '+object; "
        "ES/PS: P(new) > P(true) on the rewrite prompt / paraphrases; NS: P(true) > P(new) on neighbours",
        "mismatches": MISMATCHES,
        "summary": res,
        "per_record": per_record,
    }
    write_result(out, payload, provenance=provenance)
    print(f"wrote {out} (logs and files in {workdir})")


if __name__ == "__main__":
    main()
