"""The main job (``make demo`` / ``loka demo``): edit facts on the default model and undo it exactly.

1. what the model says for a few facts; 2. one ROME edit; 3. three MEMIT edits; each shown on the
edit prompt, a paraphrase and unrelated facts, before and after; 4. save the artifact, reload it,
check the reloaded artifact gives identical logits, revert, and check the original answers (and
weights, bit for bit) are back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .api import edit
from .artifact import load_artifact
from .models import load_model
from .requests import EditRequest
from .result import format_table, probe_rows
from .scoring import generate

if TYPE_CHECKING:
    from .models.loader import ModelHandle

ROME_REQUEST = EditRequest(
    prompt="{} is located in the city of",
    subject="Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
    paraphrases=["The Eiffel Tower, a famous landmark, can be found in the city of"],
    neighborhood=["The Louvre is located in the city of", "The capital of Germany is"],
)
MEMIT_REQUESTS = [
    EditRequest(
        "The mother tongue of {} is",
        "Danielle Darrieux",
        "English",
        target_true="French",
        paraphrases=["Danielle Darrieux grew up speaking"],
        neighborhood=["The mother tongue of Jean Gabin is"],
    ),
    EditRequest(
        "{} plays the sport of",
        "Lionel Messi",
        "basketball",
        target_true="soccer",
        paraphrases=["The professional sport of Lionel Messi is"],
        neighborhood=["Roger Federer plays the sport of"],
    ),
    EditRequest(
        "{} was developed by",
        "Windows 95",
        "Apple",
        target_true="Microsoft",
        paraphrases=["The operating system Windows 95 is a product of"],
        neighborhood=["The iPhone was developed by"],
    ),
]
FACTS = [
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "Lionel Messi plays the sport of",
    "The mother tongue of Danielle Darrieux is",
]


def _logits(handle: ModelHandle, prompts):
    tok = handle.tokenizer
    with torch.no_grad():
        return [handle.model(**tok(p, return_tensors="pt").to(handle.device)).logits for p in prompts]


def _weights(handle: ModelHandle):
    return {k: v.detach().clone() for k, v in handle.model.state_dict().items()}


def run_demo(model: str = "smollm2-135m", out: str = "out/demo", device: str | None = None) -> int:
    t0 = time.time()
    out_dir = Path(out)
    print(f"== loading {model}")
    handle = load_model(model, device=device)
    print(
        f"   {handle.name}: {handle.spec.family} family, {handle.n_layers} layers, weights sha256 {handle.model_hash[:16]}"
    )
    original = _weights(handle)

    print("\n== 1. what the model says")
    for p, c in zip(FACTS, generate(handle, FACTS, max_new_tokens=6)):
        print(f"   {p} \u2192{c!r}")

    print("\n== 2. ROME: one edit")
    before = probe_rows(handle, ROME_REQUEST)
    rome_art = edit(handle, ROME_REQUEST, "rome")
    print(format_table(ROME_REQUEST, before, probe_rows(handle, ROME_REQUEST)))
    print(f"   generation: {ROME_REQUEST.text} \u2192{generate(handle, [ROME_REQUEST.text], 8)[0]!r}")
    print(f"   ({rome_art.manifest['extra']['seconds']:.1f}s, artifact {rome_art.id})")
    rome_art.revert(handle)

    print("\n== 3. MEMIT: three edits in one batch")
    befores = [probe_rows(handle, r) for r in MEMIT_REQUESTS]
    memit_art = edit(handle, MEMIT_REQUESTS, "memit")
    for r, b in zip(MEMIT_REQUESTS, befores):
        print(format_table(r, b, probe_rows(handle, r)))
    print(f"   ({memit_art.manifest['extra']['seconds']:.1f}s, artifact {memit_art.id})")
    edited_logits = _logits(handle, FACTS)

    print("\n== 4. save, reload, revert")
    path = memit_art.save(out_dir / "memit.loka", force=True)  # the demo's own output, replaced each run
    rome_path = rome_art.save(out_dir / "rome.loka", force=True)
    print(f"   saved {path} and {rome_path}")
    memit_art.revert(handle)
    same = all(torch.equal(original[k], v) for k, v in handle.model.state_dict().items())
    print(f"   reverted: weights identical to the original, bit for bit: {same}")
    reloaded = load_artifact(path)
    reloaded.apply(handle)
    identical = all(torch.equal(a, b) for a, b in zip(edited_logits, _logits(handle, FACTS)))
    print(
        f"   reloaded {reloaded.id} (sha256 checked) and applied: logits identical to the in-memory edit: {identical}"
    )
    reloaded.revert(handle)
    for p, c in zip(FACTS, generate(handle, FACTS, max_new_tokens=6)):
        print(f"   after revert: {p} \u2192{c!r}")
    same = all(torch.equal(original[k], v) for k, v in handle.model.state_dict().items())
    print(f"\n== done in {time.time() - t0:.0f}s; original weights restored exactly: {same}")
    return 0 if same and identical else 1
