"""Model builders, and the plain-timm code the plugin is measured against.

Models are named by timm name with optional ``create_model`` overrides (``name:key=value:...``), built with random
weights (``pretrained=False``: nothing is downloaded, and timing does not depend on weights). The references here
are written from timm's own modules, independently of the plugin's pruned forward: a hand-written gather forward
per model kind, and the paper-code-style baseline (explicit softmax attention, the last map read from a hook). Keep
counts, top-k and score resampling are the plugin's own (``deit_patch.masking``), so both sides choose alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn

from deit_patch.masking import resolve_num_keep


# --- building --------------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """'name:key=value:key=value' -> (timm name, create_model overrides)."""
    name, *parts = spec.strip().split(":")
    overrides: Dict[str, Any] = {}
    for part in parts:
        key, _, value = part.partition("=")
        if not _:
            raise SystemExit(f"bad model spec {spec!r}: write name:key=value:key=value")
        for cast in (int, float):
            try:
                overrides[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            overrides[key] = {"true": True, "false": False}.get(value.lower(), value)
    return name, overrides


def short_name(spec: str) -> str:
    name, overrides = parse_spec(spec)
    abbrev = {"patch_size": "p", "depth": "d", "embed_dim": "w", "num_heads": "h"}
    extra = ",".join(f"{abbrev.get(k, k)}{v}" for k, v in overrides.items())
    return f"{name}[{extra}]" if extra else name


def build_model(spec: str, *, img_size: int, num_classes: int, device: torch.device) -> nn.Module:
    name, overrides = parse_spec(spec)
    kwargs = dict(pretrained=False, img_size=img_size, num_classes=num_classes, **overrides)
    try:
        with torch.device(device):  # initialise on the device: a 632M-parameter init on CPU takes a while
            model = timm.create_model(name, **kwargs)
    except Exception:  # noqa: BLE001 - some init code does not like a device context; build on CPU then
        model = timm.create_model(name, **kwargs).to(device)
    return model


def set_fused_attn(model: nn.Module, value: bool) -> nn.Module:
    count = 0
    for module in model.modules():
        # timm attention modules (ViT's and EVA's, fused qkv or separate q/k/v) with an explicit-softmax path
        if hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module):
            module.fused_attn = value
            count += 1
    if not count:
        raise RuntimeError(f"{type(model).__name__} has no timm Attention module to switch")
    return model


# --- layout questions, answered from timm's own attributes -----------------------------------------------------
def patch_grid(model: nn.Module) -> Tuple[int, int]:
    grid = model.patch_embed.grid_size
    return int(grid[0]), int(grid[1])


def keep_count(model: nn.Module, keep: float) -> int:
    """Patches kept at ratio ``keep``: the plugin's own rule (``masking.resolve_num_keep``; 0.5 of 196 is 98).

    The distillation section checks that the plugin's loss really runs its teacher on this many patches.
    """
    rows, cols = patch_grid(model)
    return resolve_num_keep(num_patches=rows * cols, keep_ratio=float(keep), num_keep=None)


class TokenCounter:
    """Records how many tokens a model's first block sees (a forward pre-hook): did the teacher really prune?"""

    def __init__(self, model: nn.Module):
        self.tokens: Optional[int] = None
        self.handle = model.blocks[0].register_forward_pre_hook(self._record)

    def _record(self, module, inputs) -> None:
        self.tokens = int(inputs[0].shape[1])

    def remove(self) -> None:
        self.handle.remove()


# --- hand-written gather forwards: the timm code a user would write without the plugin ------------------------
def _gather(tokens: torch.Tensor, keep_idx: torch.Tensor, prefix: int) -> torch.Tensor:
    index = keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.cat([tokens[:, :prefix], torch.gather(tokens[:, prefix:], 1, index)], dim=1)


def _vit_reference(model: nn.Module, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = _gather(x, keep_idx, model.num_prefix_tokens)
    x = model.norm_pre(x)
    x = model.blocks(x)
    x = model.norm(x)
    return model.forward_head(x)


def _eva_reference(model: nn.Module, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    # timm's Eva returns the rotary embedding beside the tokens; its own patch-dropout path indexes the rotary
    # table with the kept patches and adds a head axis, which is what this does with fixed indices.
    if getattr(model, "rope_mixed", False):
        raise NotImplementedError("the hand-written EVA reference covers one rotary table for all blocks, "
                                  "not rope_mixed (one per block)")
    x = model.patch_embed(images)
    x, rope = model._pos_embed(x)
    x = _gather(x, keep_idx, model.num_prefix_tokens)
    if rope is not None:
        rope = rope[keep_idx].unsqueeze(1)  # (N, D)[B, K] -> (B, 1, K, D)
    x = model.norm_pre(x)
    for block in model.blocks:
        x = block(x, rope=rope)
    x = model.norm(x)
    return model.forward_head(x)


@dataclass(frozen=True)
class Reference:
    name: str
    matches: Callable[[nn.Module], bool]
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# Tried in order: EVA first (it also has _pos_embed, but returns the rotary table with the tokens).
REFERENCES: List[Reference] = [
    Reference("eva", lambda m: hasattr(m, "rope") and hasattr(m, "_pos_embed"), _eva_reference),
    Reference("vit", lambda m: hasattr(m, "_pos_embed") and hasattr(m, "blocks"), _vit_reference),
]


def reference_forward(model: nn.Module, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Plain timm code, written out: embed, gather the kept patch tokens after the position embedding, run."""
    for ref in REFERENCES:
        if ref.matches(model):
            return ref.forward(model, images, keep_idx)
    raise NotImplementedError(f"no hand-written gather forward for {type(model).__name__} "
                              f"(written for: {', '.join(r.name for r in REFERENCES)})")


# --- the paper-code-style baseline ------------------------------------------------------------------------------
class MapHook:
    """Paper-code style: keep the last block's full (B, H, N, N) softmax map (forward hook on ``attn_drop``)."""

    def __init__(self, attention: nn.Module):
        self.map: Optional[torch.Tensor] = None
        self.handle = attention.attn_drop.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.map = output

    def cls_row(self, prefix: int) -> torch.Tensor:
        attn, self.map = self.map, None
        if attn is None:
            raise RuntimeError("the explicit-attention student did not run its last attention (fused_attn still on?)")
        return attn[:, :, 0, prefix:].float().mean(dim=1)
