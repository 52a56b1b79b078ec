"""Run an unmodified teacher on its prefix tokens plus a chosen subset of patch tokens.

Each supported architecture family is one registry entry with two halves around the gather point:
``embed`` (pixels -> tokens with positional embedding, prefix tokens first) and ``finish`` (the rest of the
model's own modules on whatever tokens remain). The gather happens after the positional embedding, so every kept
patch still knows where it came from. Adding a family is one ``register_family`` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .capture import unwrap_model


class UnsupportedTeacherError(ValueError):
    """The teacher has no patch tokens that masking could drop."""


@dataclass(frozen=True)
class TeacherFamily:
    name: str
    matches: Callable[[nn.Module], bool]
    # (model, images) -> (tokens after positional embedding, number of prefix tokens at the front)
    embed: Callable[[nn.Module, torch.Tensor], Tuple[torch.Tensor, int]]
    # (model, prefix + kept patch tokens) -> logits, pooled the teacher's own way
    finish: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    # model -> tokens the blocks process besides the patches (what ``embed`` puts in front), for token accounting
    num_prefix: Callable[[nn.Module], int] = lambda model: int(getattr(model, "num_prefix_tokens", 1))


TEACHER_FAMILIES: Dict[str, TeacherFamily] = {}


def register_family(family: TeacherFamily) -> TeacherFamily:
    """Add a family; entries registered later are tried first, so a subclass entry can shadow its parent's."""
    TEACHER_FAMILIES[family.name] = family
    return family


def find_family(model: nn.Module) -> Optional[TeacherFamily]:
    model = unwrap_model(model)
    for family in reversed(list(TEACHER_FAMILIES.values())):
        if family.matches(model):
            return family
    return None


def require_family(model: nn.Module) -> TeacherFamily:
    family = find_family(model)
    if family is None:
        name = type(unwrap_model(model)).__name__
        raise UnsupportedTeacherError(
            f"teacher {name} has no patch tokens to mask (supported: {', '.join(TEACHER_FAMILIES)}): distil from it "
            "unmasked with keep_ratio=1.0 (or mask_mode='none'), as DeiT does with a RegNetY teacher")
    return family


def gather_patches(tokens: torch.Tensor, keep_idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Prefix tokens followed by the patch tokens at ``keep_idx`` (B, K) (indices count patches only)."""
    patches = tokens[:, num_prefix:]
    index = keep_idx.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    kept = torch.gather(patches, 1, index)
    return torch.cat([tokens[:, :num_prefix], kept], dim=1) if num_prefix else kept


def teacher_grid(model: nn.Module, image_hw: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """The teacher's patch grid: as built, or for ``image_hw`` when the teacher resizes its position embedding."""
    patch_embed = unwrap_model(model).patch_embed
    if image_hw is not None and getattr(unwrap_model(model), "dynamic_img_size", False):
        ph, pw = patch_embed.patch_size
        return image_hw[0] // ph, image_hw[1] // pw
    return int(patch_embed.grid_size[0]), int(patch_embed.grid_size[1])


def num_teacher_patches(model: nn.Module, image_hw: Optional[Tuple[int, int]] = None) -> int:
    rows, cols = teacher_grid(model, image_hw)
    return rows * cols


def pruned_forward(teacher: nn.Module, images: torch.Tensor, keep_idx: Optional[torch.Tensor],
                   family: Optional[TeacherFamily] = None) -> torch.Tensor:
    """Teacher logits from prefix tokens + the patches in ``keep_idx`` (None keeps all)."""
    model = unwrap_model(teacher)
    family = family or require_family(model)
    tokens, num_prefix = family.embed(model, images)
    if keep_idx is not None:
        tokens = gather_patches(tokens, keep_idx, num_prefix)
    return family.finish(model, tokens)


class PrunedTeacher(nn.Module):
    """``pruned_forward`` as a module: a thing fvcore can trace and torch.compile can compile."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = unwrap_model(teacher)
        self.family = require_family(self.teacher)

    def forward(self, images: torch.Tensor, keep_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        return pruned_forward(self.teacher, images, keep_idx, self.family)


# --- timm VisionTransformer: vit_*, deit_*, deit_*_distilled, deit3_* --------------------------------------
def _is_timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer
    return isinstance(model, VisionTransformer)


def _vit_embed(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, int]:
    # timm's own _pos_embed: class/register/distillation tokens, no_embed_class (DeiT-III), dynamic sizes.
    return model._pos_embed(model.patch_embed(images)), int(model.num_prefix_tokens)


def _vit_finish(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    tokens = model.norm_pre(tokens)
    tokens = model.blocks(tokens)
    return model.forward_head(model.norm(tokens))


register_family(TeacherFamily("vit", _is_timm_vit, _vit_embed, _vit_finish))


# --- DeiT repo's models.py: DistilledVisionTransformer subclasses timm's ViT and writes its own forward ------
def _is_deit_repo_distilled(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.deit import VisionTransformerDistilled
    return (isinstance(model, VisionTransformer) and not isinstance(model, VisionTransformerDistilled)
            and hasattr(model, "dist_token") and hasattr(model, "head_dist")
            and type(model).forward_features is not VisionTransformer.forward_features)


def _deit_repo_embed(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, int]:
    patches = model.patch_embed(images)
    batch = patches.shape[0]
    tokens = torch.cat([model.cls_token.expand(batch, -1, -1), model.dist_token.expand(batch, -1, -1), patches], 1)
    return model.pos_drop(tokens + model.pos_embed), 2


def _deit_repo_finish(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    tokens = model.norm(model.blocks(tokens))
    # The repo's eval-mode output: the mean of the class-token and distillation-token heads.
    return (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2


register_family(TeacherFamily("deit_repo_distilled", _is_deit_repo_distilled, _deit_repo_embed, _deit_repo_finish,
                              num_prefix=lambda model: 2))


# --- timm Cait: patches run alone through the self-attention blocks; the class token joins afterwards --------
def _is_cait(model: nn.Module) -> bool:
    from timm.models.cait import Cait
    return isinstance(model, Cait)


def _cait_embed(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, int]:
    return model.pos_drop(model.patch_embed(images) + model.pos_embed), 0


def _cait_finish(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    tokens = model.blocks(tokens)
    cls = model.cls_token.expand(tokens.shape[0], -1, -1)
    for block in model.blocks_token_only or ():
        cls = block(tokens, cls)
    return model.forward_head(model.norm(torch.cat([cls, tokens], dim=1)))


# The class token only enters the last class-attention blocks, so the self-attention blocks see patches alone.
register_family(TeacherFamily("cait", _is_cait, _cait_embed, _cait_finish, num_prefix=lambda model: 0))
