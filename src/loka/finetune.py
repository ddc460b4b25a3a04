"""Supervised fine-tuning on question/answer pairs (answer-only loss): TOFU's first stage.

TOFU unlearning starts from a model that was fine-tuned on the fictitious-author questions, so that
it knows the facts it is then asked to forget. :func:`finetune` trains every parameter of the model
with AdamW on ``NLL(answer | Question: q\\nAnswer:)`` (prompt tokens masked), writes the result as a
Hugging Face folder that :func:`loka.load_model` reads, and leaves the given handle's weights as they
were (restored bit for bit, also on an error).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import LokaError
from .forgetting import losses as L
from .methods.base import check_loss
from .models.loader import check_export_output
from .utils.progress import bar as progress_bar
from .weights import preserved_weights

if TYPE_CHECKING:
    from .models.loader import ModelHandle

log = logging.getLogger(__name__)


def finetune(
    handle: ModelHandle,
    prompts: list[str],
    answers: list[str],
    out: str | Path,
    *,
    epochs: int = 5,
    lr: float = 1e-4,
    batch_size: int = 16,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Fine-tune on (prompt, answer) pairs and save the model to ``out``; returns the run's record
    (steps, seconds, loss per epoch), also written to ``out/loka_finetune.json``. ``out`` is checked
    before training: an existing folder is replaced only if loka exported it and ``force`` is true."""
    if len(prompts) != len(answers) or not prompts:
        raise LokaError(
            f"finetune: need as many answers as prompts, and at least one (got {len(prompts)}/{len(answers)})"
        )
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise LokaError(
            f"finetune: epochs and batch_size must be >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})"
        )
    check_export_output(out, force=force)
    model = handle.model
    names = [n for n, _ in model.named_parameters()]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    order = list(range(len(prompts)))
    steps_per_epoch = (len(order) + batch_size - 1) // batch_size
    t0 = time.time()
    losses: list[float] = []
    with preserved_weights(model, names):
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        model.train()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, steps_per_epoch))
        )  # 1-epoch warm-up
        bar = progress_bar(total=epochs * steps_per_epoch, desc="finetune", unit="step", disable=not progress)
        try:
            for _ in range(epochs):
                rng.shuffle(order)
                total = 0.0
                for i in range(0, len(order), batch_size):
                    idx = order[i : i + batch_size]
                    b = L.qa_batch(handle.tokenizer, [prompts[j] for j in idx], [answers[j] for j in idx])
                    lg, rows = L.answer_logits(handle, b)
                    loss = L.nll_loss(*L.sequence_logprobs(lg, rows, b))
                    check_loss(loss, "finetune", len(losses) * steps_per_epoch + i // batch_size + 1)
                    opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    total += float(loss.detach())
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                    bar.update(1)
                losses.append(total / steps_per_epoch)
                log.info("finetune epoch %d: mean loss %.4f", len(losses), losses[-1])
        finally:
            bar.close()
            model.eval()
            for p in params:
                p.requires_grad_(False)
        seconds = time.time() - t0
        record = {
            "base_model": handle.name,
            "base_hash": handle.model_hash,
            "n": len(prompts),
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "steps": epochs * steps_per_epoch,
            "seconds": round(seconds, 1),
            "epoch_loss": [round(x, 4) for x in losses],
        }
        # the fine-tuned weights, before they are restored
        handle.save_pretrained(
            out, force=force, info={"finetune": True}, files={"loka_finetune.json": record}
        )
    return record
