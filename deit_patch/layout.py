"""Layout questions about a model: patch grid, prefix tokens, patch count, input channels, token model.

One function and one answer each. Every answer is read from the model's attributes and checked against the
others it can be checked against (grid against patch count and position embedding, prefix count against the
position embedding, channels against the module the image really meets first); where the attributes do not
settle the question the answer is None, "cannot tell", never a guess. Callers that go on to run the model still
verify against what it really produces (token counts in capture and teachers); nothing here runs a model.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

Grid = Tuple[int, int]

__all__ = ["Grid", "built_image_size", "class_token_is_read", "input_channels", "is_dynamic_size", "num_patches",
           "patch_grid", "prefix_tokens", "probe_image_size", "token_model", "unwrap_model", "wrapper_chain"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, in any nesting."""
    return wrapper_chain(model)[-1]


def wrapper_chain(model: nn.Module) -> List[nn.Module]:
    """``model``, then each module it wraps (DDP ``.module``, torch.compile ``._orig_mod``), down to the bare model."""
    chain = [model]
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
            type(model).__name__ in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")
            and isinstance(getattr(model, "module", None), nn.Module)
        ):
            model = model.module
        else:
            return chain
        chain.append(model)


def _pair(value) -> Optional[Grid]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    return None


def _patch_embed(model: nn.Module) -> Optional[nn.Module]:
    """The module that turns pixels into patch tokens: ``patch_embed`` (timm, DeiT), ``embeds`` (NaFlexViT)."""
    model = unwrap_model(model)
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, nn.Module):
        return embed
    embed = getattr(model, "embeds", None)
    return embed if isinstance(embed, nn.Module) and _pair(getattr(embed, "patch_size", None)) else None


def _unit_grid(model: nn.Module) -> Optional[Grid]:
    # Hiera keeps its token grid on the model (tokens_spatial_shape) with the stride that made it (patch_stride).
    shape, stride = getattr(model, "tokens_spatial_shape", None), _pair(getattr(model, "patch_stride", None))
    grid = _pair(tuple(shape)) if isinstance(shape, (list, tuple)) else None
    return grid if grid is not None and stride is not None else None


def is_dynamic_size(model: nn.Module) -> bool:
    """Whether the model's patch grid follows each batch's resolution.

    timm's ``dynamic_img_size`` models resize their position embedding per batch; a patch embedding with a patch
    size but no built image size (NaFlexViT) has no fixed grid at all.
    """
    model = unwrap_model(model)
    if getattr(model, "dynamic_img_size", False) is True:
        return True
    embed = _patch_embed(model)
    return (embed is not None and embed is getattr(model, "embeds", None)
            and getattr(embed, "default_img_size", None) is None)


def built_image_size(model: nn.Module) -> Optional[Grid]:
    """The (height, width) the model was built for, or None if it does not say (or has no fixed size)."""
    model = unwrap_model(model)
    embed = _patch_embed(model)
    size = _pair(getattr(embed, "img_size", None)) if embed is not None else None
    if size is None and embed is not None:
        size = _pair(getattr(embed, "default_img_size", None))
    if size is None and _unit_grid(model) is not None:
        grid, stride = _unit_grid(model), _pair(model.patch_stride)
        size = grid[0] * stride[0], grid[1] * stride[1]
    return size


def _built_grid(model: nn.Module, embed: nn.Module) -> Optional[Grid]:
    grid = _pair(getattr(embed, "grid_size", None))
    count = getattr(embed, "num_patches", None)
    if grid is None and _unit_grid(model) is not None:
        return _unit_grid(model)
    if grid is None:
        # No grid_size (XCiT's ConvPatchEmbed): image size over patch size, only where the embedding's own
        # num_patches confirms it (an overlapping embedding states no count and gets no grid).
        size, patch = _pair(getattr(embed, "img_size", None)), _pair(getattr(embed, "patch_size", None))
        if size is None or patch is None or not isinstance(count, int) or hasattr(embed, "backbone"):
            return None
        grid = size[0] // patch[0], size[1] // patch[1]
        return grid if grid[0] * grid[1] == count and min(grid) >= 1 else None
    if min(grid) < 1:
        return None
    if isinstance(count, int) and count != grid[0] * grid[1]:
        return None  # the embedding contradicts itself
    return grid


def patch_grid(model: nn.Module, image_hw: Optional[Sequence[int]] = None) -> Optional[Grid]:
    """(rows, cols) of the model's patch grid: as built, or for an ``image_hw`` input; None when it cannot tell.

    The built grid is the patch embedding's ``grid_size`` (checked against its ``num_patches``; Hiera's
    ``tokens_spatial_shape``; image over patch size where ``num_patches`` confirms it, as in XCiT). For another
    input size the grid is known only for a model that follows the input (``is_dynamic_size``): its patch
    embedding's own ``dynamic_feat_size`` where it has one (timm >= 0.9, which pads up to whole patches under
    ``dynamic_img_pad``), else the patch size, rounded the way the embedding pads.
    A fixed-size model at another size has no grid to tell (its forward refuses the input or its position
    embedding does not fit).
    """
    model = unwrap_model(model)
    embed = _patch_embed(model)
    if embed is None:
        return None
    built = _built_grid(model, embed)
    if image_hw is None:
        return built
    image_hw = (int(image_hw[0]), int(image_hw[1]))
    if not is_dynamic_size(model):
        return built if built is not None and built_image_size(model) in (None, image_hw) else None
    feat_size = getattr(embed, "dynamic_feat_size", None)
    if callable(feat_size):
        return _pair(tuple(int(v) for v in feat_size(image_hw)))
    patch = _pair(getattr(embed, "patch_size", None))
    if patch is None or hasattr(embed, "backbone"):
        return None  # a CNN stem before the projection: its stride is not the patch size
    if getattr(embed, "dynamic_img_pad", False) or getattr(model, "dynamic_img_pad", False):
        return math.ceil(image_hw[0] / patch[0]), math.ceil(image_hw[1] / patch[1])
    return image_hw[0] // patch[0], image_hw[1] // patch[1]


def probe_image_size(model: nn.Module) -> Optional[Grid]:
    """An input size the model certainly accepts: the built one, or 4 x 4 patches for a size-following model."""
    size = built_image_size(model)
    if size is not None:
        return size
    embed = _patch_embed(model)
    patch = _pair(getattr(embed, "patch_size", None)) if embed is not None else None
    if patch is not None and is_dynamic_size(model) and not hasattr(embed, "backbone"):
        return 4 * patch[0], 4 * patch[1]
    return None


def num_patches(model: nn.Module, image_hw: Optional[Sequence[int]] = None) -> Optional[int]:
    """Patch tokens for an ``image_hw`` input (as built when None); None when the grid cannot be told."""
    grid = patch_grid(model, image_hw)
    return grid[0] * grid[1] if grid is not None else None


def _tokens_present(model: nn.Module) -> int:
    count = sum(int(isinstance(getattr(model, name, None), torch.Tensor)) for name in ("cls_token", "dist_token"))
    registers = getattr(model, "reg_token", None)
    if isinstance(registers, torch.Tensor) and registers.dim() == 3:
        count += int(registers.shape[1])
    return count


def prefix_tokens(model: nn.Module) -> Optional[int]:
    """Tokens in front of the patches (class, distillation, register), or None when the attributes disagree.

    timm >= 0.6 states ``num_prefix_tokens``, timm < 0.6 ``num_tokens``, DeiT's models_v2.py neither, and DeiT's
    distilled subclass of timm's ViT adds a ``dist_token`` its inherited ``num_prefix_tokens`` does not count: so
    the tokens that exist are counted, and a stated count can only raise that (timm may hold tokens under names
    this does not know). A learned position embedding, where there is one, must cover the patches alone or the
    patches plus exactly this prefix. Callers that run the model still check the count against its real output.
    """
    model = unwrap_model(model)
    stated = getattr(model, "num_prefix_tokens", getattr(model, "num_tokens", None))
    present = _tokens_present(model)
    prefix = max(int(stated), present) if isinstance(stated, int) and not isinstance(stated, bool) else present
    pos_embed = getattr(model, "pos_embed", None)
    embed = _patch_embed(model)
    patches = _built_grid(model, embed) if embed is not None else None
    if isinstance(pos_embed, torch.Tensor) and pos_embed.dim() == 3 and patches is not None:
        count = patches[0] * patches[1]
        if int(pos_embed.shape[1]) not in (count, count + prefix):
            return None
    return prefix


def class_token_is_read(model: nn.Module) -> Optional[bool]:
    """Whether the model's head reads its class token (token 0); None when it cannot tell.

    timm's ViTs say so in ``global_pool`` ('token'; 'avg', 'max', 'map' pool the patches instead); models without
    the attribute (timm < 0.6, DeiT's own models) read ``x[:, 0]`` when they have a class token. The class token
    may live on the model or on its patch embedding (NaFlexViT).
    """
    model = unwrap_model(model)
    embed = _patch_embed(model)
    token = getattr(model, "cls_token", None)
    if token is None and embed is not None:
        token = getattr(embed, "cls_token", None)
    if not isinstance(token, torch.Tensor):
        return False
    pool = getattr(model, "global_pool", None)
    if pool is None:
        return True if not hasattr(model, "attn_pool") else None
    if isinstance(pool, str):
        return pool == "token"
    return None


def _first_conv_from_cfg(model: nn.Module, embed: nn.Module) -> Optional[nn.Module]:
    """The convolution timm names as ``first_conv``, if it sits in the patch embedding (where the image enters).

    A CNN's ``first_conv`` is not always the image's: TResNet's follows a space-to-depth step (48 channels for RGB).
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("first_conv") if isinstance(cfg, dict) else None
    if not names:
        return None
    names = (names,) if isinstance(names, str) else tuple(names)
    inside = {id(m) for m in embed.modules()}
    convs = []
    for name in names:
        try:
            convs.append(model.get_submodule(name))
        except AttributeError:
            return None
    if not all(isinstance(conv, nn.modules.conv._ConvNd) and id(conv) in inside for conv in convs):
        return None
    return convs[0] if len({conv.in_channels for conv in convs}) == 1 else None


def input_channels(model: Optional[nn.Module]) -> Optional[int]:
    """Channels a patch-token model's input must have; None when it cannot tell (CNNs included).

    Read from the convolution the image meets first inside the patch embedding: (a) the one timm names as the
    model's ``first_conv`` (the one timm adapts when it loads weights for another ``in_chans``), or (b) the
    projection of a patch embedding whose only convolution it is. A ViT with a ResNet stem (``vit_*_r*``, VOLO)
    projects the stem's 64 channels, not the image: (a) finds the stem's first convolution, and without a config
    the answer is None rather than the projection's 64.
    """
    embed = _patch_embed(model) if model is not None else None  # _patch_embed looks through DDP / compile
    if embed is None:
        return None
    conv = _first_conv_from_cfg(unwrap_model(model), embed)
    if conv is None:
        convs = [m for m in embed.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        proj = getattr(embed, "proj", None)
        conv = proj if len(convs) == 1 and convs[0] is proj else None
    channels = getattr(conv, "in_channels", None)
    return int(channels) if isinstance(channels, int) else None


def token_model(model: nn.Module, inner: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """The module whose patch embedding makes the tokens ``inner`` sees: a ViT inside a user's wrapper.

    With ``inner`` (a block or attention module): the innermost module of ``model`` (``model`` included) that has
    a ``patch_embed`` and contains ``inner``. Without: ``model`` itself if it has a ``patch_embed``, else its one
    descendant that has one. None when there is no such module, or several and no ``inner`` to choose.
    """
    model = unwrap_model(model)
    owners = [m for m in model.modules() if _patch_embed(m) is not None]
    if inner is not None:
        found = None
        for candidate in owners:  # modules() is pre-order, so a later match is nested deeper
            if any(sub is inner for sub in candidate.modules()):
                found = candidate
        return found
    if owners and owners[0] is model:
        return model
    return owners[0] if len(owners) == 1 else None
