"""Run an unmodified teacher on its prefix tokens plus a chosen subset of patch tokens.

Each supported architecture family is one registry entry. Most are two halves around the gather point: ``embed``
(pixels -> tokens with positional embedding, prefix tokens first) and ``finish`` (the rest of the model's own
modules on whatever tokens remain). The gather happens after the positional embedding, so every kept patch still
knows where it came from. Families whose blocks need more than the tokens to follow the kept patches (a rotary
embedding, a relative position bias, patch coordinates, whole mask units) write the whole pruned ``forward``
instead, from the model's own modules and the kept indices. Adding a family is one ``register_family`` call;
``verify_family`` checks it against the model's own forward before it is trusted.

A teacher no family describes still distils unmasked, exactly as DeiT's ``DistillationLoss`` runs it;
``unmaskable_reason`` says which of its structures prevents masking.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import layout
from .layout import unwrap_model


class UnsupportedTeacherError(ValueError):
    """The teacher cannot be masked (it still distils unmasked), or a family does not describe it."""


Embed = Callable[[nn.Module, torch.Tensor], Tuple[torch.Tensor, int]]
Finish = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Forward = Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _stated_prefix(model: nn.Module) -> int:
    prefix = layout.prefix_tokens(model)
    if prefix is None:
        raise UnsupportedTeacherError(
            f"teacher {type(model).__name__}: its class/register tokens and its position embedding disagree on how "
            "many tokens precede the patches, so kept patches cannot be told apart from them: distil from it "
            "unmasked with keep_ratio=1.0")
    return prefix


@dataclass(frozen=True)
class TeacherFamily:
    name: str
    matches: Callable[[nn.Module], bool]
    # (model, images) -> (tokens after positional embedding, number of prefix tokens at the front)
    embed: Optional[Embed] = None
    # (model, prefix + kept patch tokens) -> logits, pooled the teacher's own way
    finish: Optional[Finish] = None
    # model -> tokens the blocks process besides the patches, for token accounting
    num_prefix: Callable[[nn.Module], int] = _stated_prefix
    # (model, images, kept patch indices (B, K) or None) -> logits: the whole pruned forward, for families whose
    # blocks need the kept indices themselves (rotary embedding, relative position bias, coordinates, mask units)
    forward: Optional[Forward] = None
    # (model, keep_idx) -> the kept patches as the family really uses them (Hiera: whole mask units)
    snap: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None
    # whether the output ignores the order of the kept patches (then verify_family probes a shuffled order)
    order_free: bool = True

    def __post_init__(self):
        if self.forward is None and (self.embed is None or self.finish is None):
            raise TypeError(f"TeacherFamily {self.name!r} needs embed and finish, or forward")


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
        model = unwrap_model(model)
        raise UnsupportedTeacherError(
            f"teacher {type(model).__name__} cannot be masked: {unmaskable_reason(model)}. It distils unmasked: "
            "pass keep_ratio=1.0 (or mask_mode='none') and the teacher runs whole, as DeiT's DistillationLoss "
            f"runs it (masked families: {', '.join(TEACHER_FAMILIES)})")
    return family


def gather_patches(tokens: torch.Tensor, keep_idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Prefix tokens followed by the patch tokens at ``keep_idx`` (B, K) (indices count patches only)."""
    patches = tokens[:, num_prefix:]
    index = keep_idx.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    kept = torch.gather(patches, 1, index)
    return torch.cat([tokens[:, :num_prefix], kept], dim=1) if num_prefix else kept


def kept_rows(keep_idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, prefix + K) positions in the full token sequence of the tokens a pruned forward keeps."""
    prefix = torch.arange(num_prefix, device=keep_idx.device).expand(keep_idx.shape[0], -1)
    return torch.cat([prefix, keep_idx + num_prefix], dim=1)


def snap_keep(teacher: nn.Module, keep_idx: torch.Tensor, family: Optional[TeacherFamily] = None) -> torch.Tensor:
    """The patches ``pruned_forward`` really keeps for ``keep_idx`` (the same indices except for mask-unit families)."""
    model = unwrap_model(teacher)
    family = family or require_family(model)
    return family.snap(model, keep_idx) if family.snap is not None else keep_idx


def pruned_forward(teacher: nn.Module, images: torch.Tensor, keep_idx: Optional[torch.Tensor],
                   family: Optional[TeacherFamily] = None) -> torch.Tensor:
    """Teacher logits from prefix tokens + the patches in ``keep_idx`` (None keeps all)."""
    model = unwrap_model(teacher)
    family = family or require_family(model)
    if keep_idx is not None and family.snap is not None:
        keep_idx = family.snap(model, keep_idx)
    if family.forward is not None:
        return family.forward(model, images, keep_idx)
    tokens, num_prefix = family.embed(model, images)
    if keep_idx is not None:
        tokens = gather_patches(tokens, keep_idx, num_prefix)
    return family.finish(model, tokens)


@torch.no_grad()
def verify_family(teacher: nn.Module, family: TeacherFamily, *, batch: int = 2) -> None:
    """Check that ``family`` describes this teacher: with every patch kept, its pruned forward must give ``model(x)``.

    Families are matched by type and attributes; a look-alike that differs where the match cannot see (its own
    pooling, another prefix token, a timm version whose forward changed) would otherwise give a silently wrong
    teacher signal. The patches are kept in a shuffled order (for families whose output ignores the order): a
    positional term that did not follow its token (a rotary table, a relative position bias) then shows. One probe
    batch at a size the teacher surely takes (layout.probe_image_size), in eval mode; the global RNG is left untouched.
    """
    model = unwrap_model(teacher)
    size = layout.probe_image_size(model)
    patches = layout.num_patches(model, size) if size is not None else None
    if size is None or patches is None:
        raise UnsupportedTeacherError(
            f"teacher {type(model).__name__} matched the '{family.name}' family, but its patch grid cannot be told "
            "from its patch embedding, so its pruned forward cannot be checked: distil from it unmasked with "
            "keep_ratio=1.0")
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(batch, layout.input_channels(model) or 3, *size, generator=generator)
    probe = probe.to(device=param.device, dtype=param.dtype)
    if family.order_free:
        keep_all = torch.stack([torch.randperm(patches, generator=generator) for _ in range(batch)])
    else:
        keep_all = torch.arange(patches).expand(batch, -1)
    keep_all = keep_all.to(param.device)
    was_training = model.training
    model.eval()
    try:
        want = model(probe)
        got = pruned_forward(model, probe, keep_all, family)
    finally:
        model.train(was_training)
    if isinstance(want, torch.Tensor) and want.shape == got.shape:
        # fp32: summation order alone moves logits by ~1e-6 of their scale; a misplaced position term by far more
        tol = 1e-4 if param.dtype == torch.float32 or param.dtype == torch.float64 else 5e-2
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


# --- why a teacher cannot be masked -------------------------------------------------------------------------
_WINDOWS = "window attention over a fixed feature map and downsampling between stages"
_CONV_MAPS = "convolutional stages whose feature maps need every position"
# class name -> the structure that prevents masking (timm families; a new one falls back to a structural guess)
UNMASKABLE_STRUCTURE: Dict[str, str] = {
    "SwinTransformer": "shifted-window attention over the full patch grid and patch merging between stages",
    "SwinTransformerV2": "shifted-window attention over the full patch grid and patch merging between stages",
    "SwinTransformerV2Cr": "shifted-window attention over the full patch grid and patch merging between stages",
    "MaxxVit": "MBConv stages and block/grid attention over a fixed feature map",
    "CoaT": "convolutional position and relative-position encodings (depthwise convolutions over the patch grid)",
    "ConVit": "gated positional self-attention whose position scores are built for the full patch grid",
    "CrossVit": "two token branches at different patch sizes that exchange class tokens (one kept set would be "
                "needed per branch)",
    "DaVit": "spatial-window and channel attention over a fixed feature map, with downsampling between stages",
    "EfficientFormer": _CONV_MAPS + " before the last attention stage",
    "EfficientFormerV2": _CONV_MAPS + " and attention over downsampled maps",
    "EfficientVit": "multi-scale linear attention over convolutional feature maps",
    "EfficientVitLarge": "multi-scale linear attention over convolutional feature maps",
    "EfficientVitMsra": "cascaded group attention in windows of a convolutional feature map",
    "EfficientViM": "state-space token mixing over a convolutional feature map",
    "EfficientViMDistilled": "state-space token mixing over a convolutional feature map",
    "FastVit": "convolutional token mixing (RepMixer) over a feature map",
    "FocalNet": "focal modulation by depthwise convolutions over the feature map",
    "GlobalContextVit": _WINDOWS,
    "HieraDet": "windowed attention with query pooling over a fixed token grid (timm's SAM2 Hiera has no "
                "mask-unit path)",
    "IFormer": _CONV_MAPS + " and attention over downsampled maps",
    "Levit": "attention with subsampling between stages and a learned attention bias for the full grid",
    "LevitDistilled": "attention with subsampling between stages and a learned attention bias for the full grid",
    "MetaFormer": "token mixing by pooling/convolution over the feature map",
    "MlpMixer": "token-mixing MLPs whose weights are sized for the full patch count",
    "MultiScaleVit": "pooling attention that reshapes the tokens to the full spatial grid in every block",
    "Nest": "nested blocks aggregated by convolution and pooling over the spatial grid",
    "NextViT": _CONV_MAPS + " mixed with attention over downsampled maps",
    "PoolingVisionTransformer": "pooling layers that reshape the tokens to the spatial grid between stages",
    "PyramidVisionTransformerV2": "spatial-reduction attention and overlapping patch embeddings on the full grid",
    "Sequencer2d": "LSTMs along the rows and columns of the full grid",
    "SHViT": _CONV_MAPS + " and single-head attention over downsampled maps",
    "TinyVit": _WINDOWS,
    "ByobNet": "convolutional stages, some with self-attention (bottleneck, halo, lambda or MobileViT blocks) over "
               "their feature maps",
    "CPUBone": _CONV_MAPS + " and attention over downsampled maps",
    "CSATv2": _CONV_MAPS + " and attention over downsampled maps",
    "EdgeNeXt": _CONV_MAPS + " with transposed (channel) attention",
    "SwiftFormer": _CONV_MAPS + " with efficient additive attention",
    "LowFormer": _CONV_MAPS + " and attention over downsampled maps",
    "MobileNetV5": _CONV_MAPS + " with multi-query attention blocks",
    "DeepseekVitClassifier": "a VLM vision encoder that merges neighbouring patch tokens over the full grid "
                             "before its head",
    "Gemma4VitClassifier": "a VLM vision encoder that pools neighbouring patch tokens over the full grid before "
                           "its head",
    "Qwen3VitClassifier": "a VLM vision encoder that merges neighbouring patch tokens over the full grid before "
                          "its head",
    "TNT": "pixel-level inner transformers inside each patch next to the patch tokens (two token levels)",
    "Twins": "locally-grouped windows and convolutional position encodings over the full grid",
    "Visformer": _CONV_MAPS + " and attention over downsampled maps",
    "VisionTransformerSAM": "windowed attention over a fixed grid and a convolutional neck",
    "VOLO": "outlooker blocks that aggregate each token's neighbourhood on the full grid (fold/unfold)",
    "Hiera": "this timm's Hiera has no mask-unit forward (forward_features(x, mask=...))",
}


def _has_attention(model: nn.Module) -> bool:
    return any(hasattr(m, "num_heads") or "Attention" in type(m).__name__ for m in model.modules())


def unmaskable_reason(model: nn.Module) -> str:
    """Which structure of ``model`` prevents a masked (pruned) forward, in a few words."""
    model = unwrap_model(model)
    name = type(model).__name__
    if name in UNMASKABLE_STRUCTURE:
        return UNMASKABLE_STRUCTURE[name]
    if layout.patch_grid(model) is None and not _has_attention(model):
        return "a convolutional network: its features are maps, not a set of patch tokens that could be dropped"
    return "its token layout (embedding, position encoding, stages) is not described by a registered TeacherFamily"


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


def _run_blocks(model: nn.Module, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    # Iterate rather than call: some versions hold the blocks in a ModuleList (not callable).
    for block in model.blocks:
        tokens = block(tokens, **kwargs)
    return tokens


@functools.lru_cache(maxsize=None)
def _timm_class(module: str, name: str) -> Optional[type]:
    """``timm.models.<module>.<name>`` where this timm has it, else None."""
    try:
        return getattr(__import__(f"timm.models.{module}", fromlist=[name]), name, None)
    except ImportError:
        return None


def _is_timm(module: str, name: str) -> Callable[[nn.Module], bool]:
    def matches(model: nn.Module) -> bool:
        cls = _timm_class(module, name)
        return isinstance(cls, type) and isinstance(model, cls)
    return matches


# --- timm VisionTransformer: vit_*, deit_*, deit_*_distilled, deit3_*, vit_*_r*, vitamin (timm 0.4.12 .. 1.0.x) ---
def _norm_pre(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    norm = getattr(model, "norm_pre", None)  # timm >= 0.6 ViTs; absent before and in other families
    return norm(tokens) if norm is not None else tokens


def _vit_embed(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, int]:
    patches = model.patch_embed(images)
    if _pos_embed_knows_prefix(model):
        # timm's own _pos_embed: class/register/distillation tokens, no_embed_class (DeiT-III), dynamic sizes.
        tokens, prefix = model._pos_embed(patches), _stated_prefix(model)
    else:
        tokens, prefix = _prefix_tokens_by_hand(model, patches)
    _check_token_count(model, tokens, patches, prefix)
    return tokens, prefix


def _vit_finish(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    tokens = _norm_pre(model, tokens)
    tokens = model.norm(model.blocks(tokens))
    if hasattr(model, "forward_head"):
        return model.forward_head(tokens)
    return _head_as_forward_did(model, tokens)


register_family(TeacherFamily("vit", _is_timm("vision_transformer", "VisionTransformer"), _vit_embed, _vit_finish))


# --- DeiT repo's models.py: DistilledVisionTransformer subclasses timm's ViT and writes its own forward ------
def _timm_distilled_class() -> Optional[type]:
    # timm.models.deit exists from timm 0.6; before, timm's distilled DeiT is VisionTransformer(distilled=True)
    return _timm_class("deit", "VisionTransformerDistilled")


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
    # Only models defined outside timm: timm's other token models need position biases this family does not
    # know; they have their own entries below or are refused rather than guessed at.
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


# --- relative position biases indexed by the kept token pairs -----------------------------------------------
def _pairs(bias: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A (..., H, T, T) bias over the full token sequence -> (B, H, T', T') over the kept ``rows`` (B, T')."""
    table = bias.reshape(-1, bias.shape[-2], bias.shape[-1])  # (H, T, T); a leading batch-of-one is dropped
    rows = rows.to(bias.device)
    return table[:, rows[:, :, None], rows[:, None, :]].transpose(0, 1)


@contextlib.contextmanager
def _biases_at_kept_pairs(owners: Sequence[Tuple[nn.Module, str]], rows: Optional[torch.Tensor]) -> Iterator[None]:
    """For one call: each ``owner.method()`` (the module's own bias over all token pairs) answers at kept pairs.

    The model's own method computes the full bias from its own table and index buffers; the result is then
    indexed by the kept rows and columns. The override lives in the instance ``__dict__`` only for the duration
    of the call and shadows the class's method; nothing else of the module changes.
    """
    if rows is None:
        yield
        return
    patched: List[Tuple[nn.Module, str]] = []

    def at_kept_pairs(own: Callable[[nn.Module], torch.Tensor], module: nn.Module) -> torch.Tensor:
        return _pairs(own(module), rows)
    try:
        for module, method in owners:
            own = getattr(type(module), method)
            module.__dict__[method] = functools.partial(at_kept_pairs, own, module)
            patched.append((module, method))
        yield
    finally:
        for module, method in patched:
            module.__dict__.pop(method, None)


# --- BEiT / BEiTv2 (timm Beit): per-block or shared relative position bias -----------------------------------
def _beit_forward(model: nn.Module, images: torch.Tensor, keep_idx: Optional[torch.Tensor]) -> torch.Tensor:
    attns = [block.attn for block in model.blocks]
    owners = [(attn, "_get_rel_pos_bias") for attn in attns if getattr(attn, "relative_position_bias_table",
                                                                          None) is not None]
    if any(not callable(getattr(type(attn), method, None)) for attn, method in owners):
        raise UnsupportedTeacherError(
            "this timm's BEiT computes its relative position bias inline (no Attention._get_rel_pos_bias, timm < 0.9), "
            "so it cannot be indexed by the kept token pairs: upgrade timm, or distil unmasked with keep_ratio=1.0")
    patches = model.patch_embed(images)
    tokens = torch.cat([model.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
    if getattr(model, "pos_embed", None) is not None:
        tokens = tokens + model.pos_embed
    tokens = model.pos_drop(tokens)
    _check_token_count(model, tokens, patches, 1)
    shared = model.rel_pos_bias() if getattr(model, "rel_pos_bias", None) is not None else None
    rows = None
    if keep_idx is not None:
        tokens = gather_patches(tokens, keep_idx, 1)
        rows = kept_rows(keep_idx.to(tokens.device), 1)
        shared = _pairs(shared, rows) if shared is not None else None
    with _biases_at_kept_pairs(owners, rows):
        tokens = _run_blocks(model, tokens, shared_rel_pos_bias=shared)
    return model.forward_head(model.norm(tokens))


register_family(TeacherFamily("beit", _is_timm("beit", "Beit"), forward=_beit_forward, num_prefix=lambda model: 1))


# --- vit_relpos_* / vit_srelpos_* (timm VisionTransformerRelPos): relative position MLP or table --------------
def _relpos_forward(model: nn.Module, images: torch.Tensor, keep_idx: Optional[torch.Tensor]) -> torch.Tensor:
    owners = [(block.attn.rel_pos, "get_bias") for block in model.blocks
              if getattr(block.attn, "rel_pos", None) is not None]
    patches = model.patch_embed(images)
    prefix = _stated_prefix(model)
    tokens = patches
    if getattr(model, "cls_token", None) is not None:
        tokens = torch.cat([model.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
    _check_token_count(model, tokens, patches, prefix)
    shared_module = getattr(model, "shared_rel_pos", None)
    shared = shared_module.get_bias() if shared_module is not None else None
    rows = None
    if keep_idx is not None:
        tokens = gather_patches(tokens, keep_idx, prefix)
        rows = kept_rows(keep_idx.to(tokens.device), prefix)
        shared = _pairs(shared, rows) if shared is not None else None
    tokens = _norm_pre(model, tokens)
    with _biases_at_kept_pairs(owners, rows):
        tokens = _run_blocks(model, tokens, shared_rel_pos=shared)
    return model.forward_head(model.norm(tokens))


register_family(TeacherFamily("vit_relpos", _is_timm("vision_transformer_relpos", "VisionTransformerRelPos"),
                              forward=_relpos_forward))


# --- timm Eva: EVA-02, EVA-01, DINOv3, Perception Encoder, RoPE-ViTs (rotary position embedding) ---------------
@functools.lru_cache(maxsize=None)
def _takes(function: Callable, parameter: str) -> bool:
    """Whether ``function`` (a plain function or an unbound method: no model is kept alive) has ``parameter``: a
    question about the installed timm, answered once, not on every step."""
    return parameter in inspect.signature(function).parameters


def _gather_rope(tokens: torch.Tensor, rope: torch.Tensor, keep_idx: torch.Tensor, mixed: bool) -> torch.Tensor:
    """The rotary table at the kept patches, shaped as timm's Eva shapes it after its own patch dropout."""
    from timm import layers
    apply = getattr(layers, "apply_keep_indices_nlc", None)
    if apply is not None and _takes(apply, "pos_embed_has_batch"):
        # timm >= 1.0: one gather for every rope layout (shared table, per-head, per-depth)
        gathered = apply(tokens, rope, keep_idx)
        return gathered.transpose(0, 1) if mixed else gathered.unsqueeze(1)
    if not mixed and rope.dim() == 2:
        # timm 0.9: one (patches, dim) table; (B, K, dim) -> (B, 1, K, dim) broadcasts over the heads
        return rope[keep_idx].unsqueeze(1)
    raise UnsupportedTeacherError(
        f"this timm's Eva has a rotary table of shape {tuple(rope.shape)} that it cannot gather for kept patches "
        "(no timm.layers.apply_keep_indices_nlc for it): upgrade timm, or distil unmasked with keep_ratio=1.0")


def _eva_forward(model: nn.Module, images: torch.Tensor, keep_idx: Optional[torch.Tensor]) -> torch.Tensor:
    patches = model.patch_embed(images)
    embedded = model._pos_embed(patches)
    if not (isinstance(embedded, tuple) and len(embedded) == 2):
        raise UnsupportedTeacherError("this timm's Eva._pos_embed does not return its rotary embedding: upgrade "
                                      "timm, or distil unmasked with keep_ratio=1.0")
    tokens, rope = embedded
    prefix = _stated_prefix(model)
    _check_token_count(model, tokens, patches, prefix)
    mixed = bool(getattr(model, "rope_mixed", False))
    if keep_idx is not None:
        keep_idx = keep_idx.to(tokens.device)
        tokens = gather_patches(tokens, keep_idx, prefix)
        if rope is not None:
            rope = _gather_rope(tokens, rope, keep_idx, mixed)
    tokens = _norm_pre(model, tokens)
    for depth, block in enumerate(model.blocks):
        tokens = block(tokens, rope=rope[depth] if mixed and rope is not None else rope)
    return model.forward_head(model.norm(tokens))


register_family(TeacherFamily("eva", _is_timm("eva", "Eva"), forward=_eva_forward))


# --- NaFlexViT: its own embedding (position embedding and rope for the image's grid), then the kept tokens ----
def _naflex_forward(model: nn.Module, images: torch.Tensor, keep_idx: Optional[torch.Tensor]) -> torch.Tensor:
    # The image path, not the NaFlex (coordinates) path: the two sample the position embedding differently (up to
    # 1e-2 apart on a small model), and the unmasked teacher runs the image path.
    embed_step = getattr(model, "_forward_embeds", None)
    if embed_step is None or not _takes(type(model)._forward_embeds, "patch_coord"):
        raise UnsupportedTeacherError("this timm's NaFlexViT has no _forward_embeds(x, patch_coord, ...): upgrade "
                                      "timm, or distil unmasked with keep_ratio=1.0")
    embedded = embed_step(images, patch_coord=None, patch_valid=None, attn_mask=None)
    tokens, rope, attn_mask = embedded["patches"], embedded.get("rope_embeds"), embedded.get("attn_mask")
    prefix = _stated_prefix(model)
    mixed = bool(getattr(model, "rope_is_mixed", False))
    if keep_idx is not None:
        keep_idx = keep_idx.to(tokens.device)
        tokens = gather_patches(tokens, keep_idx, prefix)
        if rope is not None:  # a mixed table is one (depth, ...) tensor: one gather for every block
            rope = _gather_rope(tokens, rope, keep_idx, mixed=mixed)
    layer_ropes = list(rope) if rope is not None and mixed else [rope] * len(model.blocks)
    for block, layer_rope in zip(model.blocks, layer_ropes):
        tokens = block(tokens, attn_mask=attn_mask) if layer_rope is None else block(
            tokens, rope=layer_rope, attn_mask=attn_mask)
    return model.forward_head(model.norm(tokens))


register_family(TeacherFamily("naflexvit", _is_timm("naflexvit", "NaFlexVit"), forward=_naflex_forward))


# --- XCiT: cross-covariance attention on the kept tokens; its local patch interaction on the grid they came from --
@contextlib.contextmanager
def _local_mixing_on_kept(modules: Sequence[nn.Module], keep_idx: Optional[torch.Tensor],
                          num_patches: int) -> Iterator[None]:
    """For one call: each ``module(x, H, W)`` (a depthwise convolution over the patch grid) sees the kept tokens
    scattered to their places on a zero grid, and returns its output at the kept places.

    The dropped places hold zeros, as Hiera's MAE path zeroes dropped pixels: the teacher sees only kept patches.
    The override lives in the instance ``__dict__`` for the duration of the call only.
    """
    if keep_idx is None:
        yield
        return

    def on_kept(own: Callable, module: nn.Module, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        index = keep_idx.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        grid = x.new_zeros(x.shape[0], num_patches, x.shape[-1]).scatter(1, index, x)
        return torch.gather(own(module, grid, height, width), 1, index)
    try:
        for module in modules:
            module.__dict__["forward"] = functools.partial(on_kept, type(module).forward, module)
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


def _xcit_forward(model: nn.Module, images: torch.Tensor, keep_idx: Optional[torch.Tensor]) -> torch.Tensor:
    patches, (rows, cols) = model.patch_embed(images)
    if getattr(model, "pos_embed", None) is not None:
        patches = patches + model.pos_embed(patches.shape[0], rows, cols).reshape(
            patches.shape[0], -1, patches.shape[1]).permute(0, 2, 1)
    tokens = model.pos_drop(patches)
    if keep_idx is not None:
        tokens = gather_patches(tokens, keep_idx, 0)
    with _local_mixing_on_kept([block.local_mp for block in model.blocks], keep_idx, rows * cols):
        for block in model.blocks:
            tokens = block(tokens, rows, cols)
    tokens = torch.cat([model.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    for block in model.cls_attn_blocks:
        tokens = block(tokens)
    return model.forward_head(model.norm(tokens))


# The class token only joins in the class-attention blocks at the end (as CaiT): the blocks see patches alone.
register_family(TeacherFamily("xcit", _is_timm("xcit", "Xcit"), forward=_xcit_forward, num_prefix=lambda model: 0))


# --- Hiera: whole mask units through the model's own MAE path (forward_features(x, mask=...)) ----------------
def _hiera_units(model: nn.Module, keep_idx: torch.Tensor) -> torch.Tensor:
    """(B, K) token indices on Hiera's token grid -> (B, K) index of the mask unit each lies in."""
    cols = int(model.tokens_spatial_shape[1])
    unit_y, unit_x = (int(s) for s in model.mask_unit_size)
    units_x = int(model.mask_spatial_shape[1])
    return (keep_idx // cols // unit_y) * units_x + (keep_idx % cols) // unit_x


def _hiera_snap(model: nn.Module, keep_idx: torch.Tensor) -> torch.Tensor:
    """Whole mask units: the ``round(K / unit size)`` units holding most kept patches, as their patches (raster)."""
    unit_size = int(model.mu_size)
    num_units = int(model.mask_spatial_shape[0]) * int(model.mask_spatial_shape[1])
    keep_units = max(1, min(num_units, int(round(int(keep_idx.shape[1]) / unit_size))))
    votes = torch.zeros(keep_idx.shape[0], num_units, device=keep_idx.device)
    votes.scatter_add_(1, _hiera_units(model, keep_idx), torch.ones_like(keep_idx, dtype=votes.dtype))
    units = votes.topk(keep_units, dim=1).indices  # ties go to the lower unit index
    rows, cols = (int(s) for s in model.tokens_spatial_shape)
    member = _hiera_units(model, torch.arange(rows * cols, device=keep_idx.device)[None])[0]  # unit of each token
    unit_tokens = member.argsort(stable=True).view(num_units, unit_size)  # each unit's tokens, in raster order
    # Gathered, not selected by a boolean mask: no nonzero(), so no host sync and no graph break under compile.
    return unit_tokens[units].flatten(1).sort(dim=1).values


def _hiera_forward(model: nn.Module, images: torch.Tensor, keep_idx: Optional[torch.Tensor]) -> torch.Tensor:
    if not _takes(type(model).forward_features, "mask"):
        raise UnsupportedTeacherError(f"teacher Hiera cannot be masked: {UNMASKABLE_STRUCTURE['Hiera']}: upgrade "
                                      "timm, or distil unmasked with keep_ratio=1.0")
    if keep_idx is None:
        return model.forward_head(model.forward_features(images))
    keep_idx = keep_idx.to(images.device)
    num_units = int(model.mask_spatial_shape[0]) * int(model.mask_spatial_shape[1])
    mask = torch.zeros(keep_idx.shape[0], num_units, dtype=torch.bool, device=images.device)
    units = _hiera_units(model, keep_idx)
    mask.scatter_(1, units, torch.ones_like(units, dtype=torch.bool))
    # One host sync per Hiera step, kept on purpose: a forward handed patches that are not whole units must refuse
    # rather than silently run other patches (pruned_forward snaps first, so through it this always holds).
    if not bool((mask.sum(1) * int(model.mu_size) == keep_idx.shape[1]).all()):
        raise UnsupportedTeacherError("Hiera keeps whole mask units: pass keep indices through snap_keep first")
    return model.forward_head(model.forward_features(images, mask=mask))


register_family(TeacherFamily("hiera", _is_timm("hiera", "Hiera"), forward=_hiera_forward, snap=_hiera_snap,
                              num_prefix=lambda model: 0, order_free=False))
