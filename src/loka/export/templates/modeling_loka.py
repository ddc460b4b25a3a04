"""Modelling file written by loka into an exported Hugging Face folder.

The folder holds a base model (the weights, with loka's weight edits folded in) and the memories of the
loka artifacts that act at inference through forward hooks: GRACE's codebook, WISE's side memory and
MEMOIR's residual memory. This file adds them to the base architecture's transformers class with plain
torch forward hooks, so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
answers as loka did with the artifacts applied. It imports only torch, transformers and the standard
library: loka need not be installed.

Where things are: ``config.loka_memory["hooks"]`` lists the hooks in the order loka installed them,
each with its kind, the module it hooks, its settings and its tensors' shapes; the tensors are buffers
of the ``loka_memory`` submodule (``loka_memory.h<i>.<name>`` in ``model.safetensors``). The folder's
``model_type`` is loka's own, so that a load without ``trust_remote_code`` fails instead of answering as
the base model.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

# Filled in by loka at export time: the base architecture's transformers classes and the folder's model type.
BASE_MODEL = "LlamaForCausalLM"
BASE_CONFIG = "LlamaConfig"
MODEL_TYPE = "loka_llama"
FORMAT = 1  # the layout of config.loka_memory this file reads

_Model = getattr(transformers, BASE_MODEL)
_Config = getattr(transformers, BASE_CONFIG)


class LokaConfig(_Config):
    """The base architecture's configuration under loka's model type; ``loka_memory`` is kept as is."""

    model_type = MODEL_TYPE


# -- GRACE: a key-value codebook on one module -----------------------------------------------------------
def grace_hook(mem: nn.Module):
    """Each position whose module input lies within ``eps_j`` of its nearest key ``k_j`` gets ``v_j`` as
    the module's output; other positions are untouched."""

    def hook(module, args, out):
        keys = mem.keys
        x = args[0]
        if len(keys) == 0:
            return out
        flat = x.reshape(-1, x.shape[-1]).float()
        d = torch.cdist(flat, keys.to(flat.device))
        dmin, j = d.min(1)
        hit = dmin < mem.eps.to(flat.device)[j]
        if not bool(hit.any()):
            return out
        o = out.reshape(-1, out.shape[-1]).clone()
        o[hit] = mem.values.to(o.device, o.dtype)[j[hit]]
        return o.reshape(out.shape)

    return hook


# -- WISE: a side memory with activation routing ---------------------------------------------------------
def wise_hook(mem: nn.Module):
    """``out + D a`` at the positions where ``||D a|| >= tau`` (``a`` the module's input)."""

    def hook(module, args, out):
        a = args[0]
        delta = mem.delta
        d = a.to(delta.dtype) @ delta.to(a.device).T
        fire = d.norm(dim=-1, keepdim=True) >= float(mem.tau)
        if not bool(fire.any()):
            return out
        return out + (d * fire).to(out.dtype)

    return hook


# -- MEMOIR: a residual memory read through prompt-dependent masks --------------------------------------
def _prompt_features(x, mask, kind: str):
    x = x.float()
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    m = mask.to(x.device)
    if kind == "last":
        last = m.shape[1] - 1 - m.flip(1).long().argmax(1)
        return x[torch.arange(x.shape[0], device=x.device), last]
    w = m.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


def _mask_columns(features, background, perm, k: int, kind: str):
    a = features.float()
    if kind == "mean_decentered":
        a = a - background.to(a.device, a.dtype)
    idx = a.abs().topk(k, dim=-1).indices
    return perm.to(idx.device)[idx].sort(dim=-1).values


def _dense(cols, width: int):
    out = torch.zeros(cols.shape[0], width, dtype=torch.float32)
    if cols.numel():
        out.scatter_(1, cols.cpu(), 1.0)
    return out


class MemoirState:
    """What MEMOIR's hooks share within one forward: its input shape, its 2-D attention mask and whether
    it continues a cached generation (then each row keeps the memory its prefill chose)."""

    def __init__(self):
        self.ctx = None
        self.rows = {}

    def pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None and kwargs.get("inputs_embeds") is not None:
            ids = kwargs["inputs_embeds"]
        shape = tuple(ids.shape[:2]) if ids is not None and ids.dim() >= 2 else None
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != shape:
            mask = None  # a 4-D or packed mask: every position counts
        self.ctx = (shape, mask, _continues_generation(kwargs))

    def post(self, module, args, out):
        self.ctx = None


def _continues_generation(kwargs) -> bool:
    """True when the forward was given a KV cache that already holds tokens (a decode step); a prefill,
    or a forward without a cache, is not one. The cache is found by what it is, not by its keyword."""
    for v in kwargs.values():
        if hasattr(v, "get_seq_length"):
            return int(v.get_seq_length()) > 0
    return False


def memoir_hook(mem: nn.Module, state: MemoirState, name: str, settings: dict):
    """``out + W_m (x ⊙ m_e)`` on the rows whose prompt retrieves stored mask ``e`` (best overlap at least
    its threshold); other rows untouched."""
    k, kind, width = int(settings["top_k"]), str(settings["prompt_feature"]), int(settings["width"])

    def retrieve(x, mask):
        masks = mem.masks.cpu()
        if masks.shape[0] == 0:
            return torch.full((x.shape[0],), -1, dtype=torch.long)
        q = _mask_columns(_prompt_features(x, mask, kind), mem.background.float(), mem.perm, k, kind)
        r = (_dense(q, width) @ _dense(masks, width).T) / k
        best, idx = r.max(1)
        return torch.where(best >= mem.taus.cpu()[idx], idx, torch.full_like(idx, -1))

    def add_output(x, out, rows):
        if bool((rows < 0).all()):
            return out
        out = out.clone()
        rows = rows.to(out.device)
        masks = mem.masks.cpu()
        for e in rows.unique().tolist():
            if e < 0:
                continue
            sel = rows == e
            cols = masks[e].to(x.device)
            w = mem.W[:, masks[e].to(mem.W.device)].to(x.device)
            out[sel] = out[sel] + (x[sel][..., cols].float() @ w.T).to(out.dtype)
        return out

    def hook(module, args, out):
        if not torch.is_tensor(out):
            return out
        x = args[0]
        if x.dim() != 3:
            return out
        B, T = x.shape[:2]
        ctx = state.ctx if state.ctx is not None and state.ctx[0] == (B, T) else None
        prev = state.rows.get(name)
        if ctx is not None and ctx[2] and prev is not None and len(prev) == B:
            rows = prev  # a decode step: keep the prefill's choice
        else:
            with torch.no_grad():
                rows = retrieve(x.detach(), ctx[1] if ctx is not None else None)
            state.rows[name] = rows
        return add_output(x, out, rows)

    return hook


class LokaForCausalLM(_Model):
    """The base architecture with loka's memories installed as forward hooks (``config.loka_memory``)."""

    config_class = LokaConfig

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        spec = getattr(config, "loka_memory", None) or {}
        if spec and int(spec.get("format", 0)) != FORMAT:
            raise ValueError(
                f"config.loka_memory has format {spec.get('format')!r}; this modeling_loka.py reads format "
                f"{FORMAT}: export the folder again with the loka that wrote it"
            )
        self.loka_memory = nn.Module()
        self._loka_memoir = None
        for i, entry in enumerate(spec.get("hooks", [])):
            mem = nn.Module()
            for name, meta in entry["tensors"].items():
                mem.register_buffer(name, torch.zeros(meta["shape"], dtype=getattr(torch, meta["dtype"])))
            self.loka_memory.add_module(f"h{i}", mem)
            kind = entry["kind"]
            if kind == "grace":
                hook = grace_hook(mem)
            elif kind == "wise":
                hook = wise_hook(mem)
            elif kind == "memoir":
                if self._loka_memoir is None:
                    self._loka_memoir = MemoirState()
                    self.register_forward_pre_hook(self._loka_memoir.pre, with_kwargs=True)
                    self.register_forward_hook(self._loka_memoir.post)
                hook = memoir_hook(mem, self._loka_memoir, f"h{i}", entry.get("settings", {}))
            else:
                raise ValueError(
                    f"config.loka_memory hook {i} has kind {kind!r}, which this modeling_loka.py does not know"
                )
            self.get_submodule(entry["module"]).register_forward_hook(hook)
