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

from .capture import expected_prefix_tokens, unwrap_model


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


@torch.no_grad()
def verify_family(teacher: nn.Module, family: TeacherFamily, *, batch: int = 2) -> None:
    """Check that ``family`` describes this teacher: with every patch kept, its embed/finish must give ``model(x)``.

    Families are matched by type and attributes; a look-alike that differs where the match cannot see (its own
    pooling, another prefix token, a timm version whose forward changed) would otherwise give a silently wrong
    teacher signal. One probe batch at the size the teacher was built for, in eval mode; the RNG is left untouched.
    """
    model = unwrap_model(teacher)
    img = getattr(model.patch_embed, "img_size", None)
    if img is None:
        return  # no stated input size to probe with
    img = (img, img) if isinstance(img, int) else (int(img[0]), int(img[1]))
    param = next(model.parameters())
    in_chans = getattr(getattr(model.patch_embed, "proj", None), "in_channels", 3)
    probe = torch.randn(batch, in_chans, *img, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=param.device, dtype=param.dtype)
    keep_all = torch.arange(num_teacher_patches(model), device=param.device).expand(batch, -1)
    was_training = model.training
    model.eval()
    try:
        want = model(probe)
        got = pruned_forward(model, probe, keep_all, family)
    finally:
        model.train(was_training)
    if isinstance(want, torch.Tensor) and want.shape == got.shape:
        tol = 1e-3 if param.dtype == torch.float32 or param.dtype == torch.float64 else 5e-2
        scale = max(1.0, float(want.float().abs().max()))
        diff = float((got.float() - want.float()).abs().max())
        if diff <= tol * scale:
            return
        detail = f"they differ by up to {diff:.3g}"
    else:
        detail = (f"the model returns {type(want).__name__} {tuple(getattr(want, 'shape', ()))}, the pruned forward "
                  f"{tuple(got.shape)}")
    raise UnsupportedTeacherError(
        f"teacher {type(model).__name__} matched the '{family.name}' family, but its pruned forward with every patch "
        f"kept does not reproduce its own eval-mode output ({detail}): register a TeacherFamily that describes it, "
        "or distil from it unmasked with keep_ratio=1.0")


class PrunedTeacher(nn.Module):
    """``pruned_forward`` as a module: a thing fvcore can trace and torch.compile can compile."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = unwrap_model(teacher)
        self.family = require_family(self.teacher)

    def forward(self, images: torch.Tensor, keep_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        return pruned_forward(self.teacher, images, keep_idx, self.family)


# --- token building shared by the ViT-style families ------------------------------------------------------
def _prefix_tokens_by_hand(model: nn.Module, patches: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """cls (+ dist) tokens + patches + position embedding + pos_drop, the way timm < 0.6 and DeiT's repo write it.

    A position embedding as long as the patches alone (DeiT-III) is added before the prefix tokens are put in front.
    """
    batch, num = patches.shape[0], patches.shape[1]
    prefix = [token.expand(batch, -1, -1) for token in (getattr(model, "cls_token", None),
                                                        getattr(model, "dist_token", None)) if token is not None]
    pos_len = model.pos_embed.shape[1]
    if pos_len == num:
        tokens = torch.cat(prefix + [patches + model.pos_embed], dim=1)
    elif pos_len == num + len(prefix):
        tokens = torch.cat(prefix + [patches], dim=1) + model.pos_embed
    else:
        raise UnsupportedTeacherError(
            f"teacher {type(model).__name__} has a position embedding of {pos_len} entries for {num} patches and "
            f"{len(prefix)} class/distillation tokens: build it at the input size you feed it (img_size=)")
    return getattr(model, "pos_drop", nn.Identity())(tokens), len(prefix)


def _pos_embed_knows_prefix(model: nn.Module) -> bool:
    # timm >= 0.6 builds the prefix tokens in `_pos_embed`, but before 0.9 VisionTransformerDistilled (and any subclass
    # that adds a dist_token, like DeiT's models.py) leaves it inherited and puts the distillation token in itself.
    if not hasattr(model, "_pos_embed"):
        return False
    if getattr(model, "dist_token", None) is None:
        return True
    from timm.models.vision_transformer import VisionTransformer
    return type(model)._pos_embed is not VisionTransformer._pos_embed


def _check_token_count(model: nn.Module, tokens: torch.Tensor, patches: torch.Tensor, prefix: int) -> None:
    # Verify the prefix count against what the model produced: a wrong count would gather the wrong tokens silently.
    num_patches = 1
    for size in patches.shape[1:-1]:  # (B, N, C), or (B, H, W, C) from a timm >= 0.9 dynamic-size patch embedding
        num_patches *= int(size)
    if tokens.shape[1] != prefix + num_patches:
        raise UnsupportedTeacherError(
            f"teacher {type(model).__name__} produced {tokens.shape[1]} tokens for {num_patches} patches, but "
            f"{prefix} prefix tokens were expected: register a TeacherFamily that describes this model")


def _head_as_forward_did(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    # Models without forward_head (timm < 0.6, DeiT's own models): pre_logits on the class token, or, for a
    # distilled model, the mean of the class and distillation heads (their eval-mode output).
    if getattr(model, "dist_token", None) is not None and getattr(model, "head_dist", None) is not None:
        return (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
    return model.head(getattr(model, "pre_logits", nn.Identity())(tokens[:, 0]))


def _run_blocks(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    # Iterate rather than call: some versions hold the blocks in a ModuleList (not callable).
    for block in model.blocks:
        tokens = block(tokens)
    return tokens


# --- timm VisionTransformer: vit_*, deit_*, deit_*_distilled, deit3_* (timm 0.4.12 .. 1.0.x) ----------------
def _is_timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer
    return isinstance(model, VisionTransformer)


def _vit_embed(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, int]:
    patches = model.patch_embed(images)
    if _pos_embed_knows_prefix(model):
        # timm's own _pos_embed: class/register/distillation tokens, no_embed_class (DeiT-III), dynamic sizes.
        tokens, prefix = model._pos_embed(patches), expected_prefix_tokens(model)
    else:
        tokens, prefix = _prefix_tokens_by_hand(model, patches)
    _check_token_count(model, tokens, patches, prefix)
    return tokens, prefix


def _vit_finish(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    tokens = getattr(model, "norm_pre", nn.Identity())(tokens)
    tokens = model.norm(model.blocks(tokens))
    if hasattr(model, "forward_head"):
        return model.forward_head(tokens)
    return _head_as_forward_did(model, tokens)


register_family(TeacherFamily("vit", _is_timm_vit, _vit_embed, _vit_finish, num_prefix=expected_prefix_tokens))


# --- DeiT repo's models.py: DistilledVisionTransformer subclasses timm's ViT and writes its own forward ------
def _timm_distilled_class() -> Optional[type]:
    try:  # timm.models.deit exists from timm 0.6; before, timm's distilled DeiT is VisionTransformer(distilled=True)
        from timm.models.deit import VisionTransformerDistilled
    except ImportError:
        return None
    return VisionTransformerDistilled


def _is_deit_repo_distilled(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer
    timm_distilled = _timm_distilled_class()
    return (isinstance(model, VisionTransformer)
            and not (timm_distilled is not None and isinstance(model, timm_distilled))
            and getattr(model, "dist_token", None) is not None and getattr(model, "head_dist", None) is not None
            and type(model).forward_features is not VisionTransformer.forward_features)


def _deit_repo_embed(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, int]:
    patches = model.patch_embed(images)
    tokens, prefix = _prefix_tokens_by_hand(model, patches)
    _check_token_count(model, tokens, patches, prefix)
    return tokens, prefix


def _deit_repo_finish(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    # The repo's forward: blocks, norm, then the mean of the class and distillation heads in eval.
    return _head_as_forward_did(model, model.norm(_run_blocks(model, tokens)))


register_family(TeacherFamily("deit_repo_distilled", _is_deit_repo_distilled, _deit_repo_embed, _deit_repo_finish,
                              num_prefix=lambda model: 2))


# --- ViTs written outside timm (DeiT's models_v2.py, DeiT-III): own blocks, class token, optional dist token --
_VIT_PARTS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "head")


def _is_own_vit(model: nn.Module) -> bool:
    # Only models defined outside timm: timm's other token models (BEiT, EVA, ...) need position biases this
    # family does not know, and they are refused rather than guessed at.
    from timm.models.vision_transformer import VisionTransformer
    return (not isinstance(model, VisionTransformer) and not type(model).__module__.startswith("timm.")
            and all(hasattr(model, p) for p in _VIT_PARTS)
            and getattr(model, "cls_token", None) is not None and not hasattr(model, "blocks_token_only"))


register_family(TeacherFamily("own_vit", _is_own_vit, _deit_repo_embed, _deit_repo_finish,
                              num_prefix=lambda model: sum(getattr(model, t, None) is not None
                                                           for t in ("cls_token", "dist_token"))))


# --- CaiT (timm's Cait, DeiT's cait_models.py): patches run alone through the self-attention blocks ----------
def _is_cait(model: nn.Module) -> bool:
    return all(hasattr(model, p) for p in _VIT_PARTS + ("blocks_token_only",))


def _cait_embed(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, int]:
    patches = model.patch_embed(images)
    return getattr(model, "pos_drop", nn.Identity())(patches + model.pos_embed), 0


def _cait_finish(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    tokens = _run_blocks(model, tokens)
    cls = model.cls_token.expand(tokens.shape[0], -1, -1)
    for block in model.blocks_token_only or ():
        cls = block(tokens, cls)
    tokens = model.norm(torch.cat([cls, tokens], dim=1))
    # timm >= 0.6 pools in forward_head (global_pool); before, and in DeiT's cait_models.py, head(class token).
    return model.forward_head(tokens) if hasattr(model, "forward_head") else model.head(tokens[:, 0])


# The class token only enters the last class-attention blocks, so the self-attention blocks see patches alone.
register_family(TeacherFamily("cait", _is_cait, _cait_embed, _cait_finish, num_prefix=lambda model: 0))
