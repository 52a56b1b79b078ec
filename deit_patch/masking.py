"""Turn patch scores into the indices of the teacher patches to keep.

Every criterion returns a (B, num_keep) LongTensor of teacher patch indices, sorted ascending so the kept
tokens keep their raster order (the teacher's output does not depend on it, but determinism and debugging do).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def resample_scores(scores: torch.Tensor, *, src_grid: Tuple[int, int], dst_grid: Tuple[int, int]) -> torch.Tensor:
    """Map (B, src_h*src_w) scores onto a (B, dst_h*dst_w) grid (a patch14 teacher for a patch16 student, ...)."""
    if tuple(src_grid) == tuple(dst_grid):
        return scores
    batch = scores.shape[0]
    grid = scores.reshape(batch, 1, src_grid[0], src_grid[1]).float()
    # Antialiasing when shrinking averages the student patches each teacher patch covers instead of sampling one.
    shrinking = dst_grid[0] < src_grid[0] or dst_grid[1] < src_grid[1]
    out = F.interpolate(grid, size=tuple(dst_grid), mode="bilinear", align_corners=False, antialias=shrinking)
    return out.reshape(batch, dst_grid[0] * dst_grid[1])


def topk_indices(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices of the ``num_keep`` highest scores per row, ascending."""
    return scores.topk(num_keep, dim=1, sorted=False).indices.sort(dim=1).values


def random_indices(batch_size: int, num_patches: int, num_keep: int, *, device: torch.device,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uniform random subset per sample, from torch's RNG (so a seed reproduces it)."""
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    return topk_indices(noise, num_keep)


def _by_scores(*, scores: Optional[torch.Tensor], batch_size: int, num_patches: int, num_keep: int,
               device: torch.device) -> torch.Tensor:
    if scores is None or scores.shape != (batch_size, num_patches):
        raise ValueError(f"score-based masking needs scores of shape ({batch_size}, {num_patches}), got "
                         f"{None if scores is None else tuple(scores.shape)}")
    return topk_indices(scores, num_keep)


def _at_random(*, scores: Optional[torch.Tensor], batch_size: int, num_patches: int, num_keep: int,
               device: torch.device) -> torch.Tensor:
    return random_indices(batch_size, num_patches, num_keep, device=device)


def mixed_selector(attention_share: float) -> Callable[..., torch.Tensor]:
    """A selector keeping ``round(attention_share * num_keep)`` patches by score and the rest uniformly at random
    from the patches left over.

    Why: on images whose class is drawn by where the ink is *not* (digits), a student's top-attention patches
    can leave the teacher without the background that shapes the class, and the student then learns from the
    wrong targets it chose itself (docs/real_images.md). The random share keeps every region in reach.
    """
    share = float(attention_share)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"attention_share={attention_share} is outside [0, 1]: the fraction of kept patches chosen "
                         "by score (0: all at random, 1: all by score, as mask_mode='attention')")

    def select(*, scores: Optional[torch.Tensor], batch_size: int, num_patches: int, num_keep: int,
               device: torch.device) -> torch.Tensor:
        by_score = int(round(share * num_keep))
        noise = torch.rand(batch_size, num_patches, device=device)
        if by_score:
            chosen = _by_scores(scores=scores, batch_size=batch_size, num_patches=num_patches, num_keep=by_score,
                                device=device)
            # Uniform draws lie in [0, 1): a 2 puts the score-chosen patches first whatever the draw.
            noise.scatter_(1, chosen.to(noise.device), 2.0)
        return topk_indices(noise, num_keep)

    return select


# name -> (selector, where its scores come from: 'student', 'teacher' or None)
MASK_MODES: Dict[str, Tuple[Callable[..., torch.Tensor], Optional[str]]] = {
    "attention": (_by_scores, "student"),   # MaskedKD: the student's last-layer class-token attention
    "random": (_at_random, None),           # the paper's random-mask baseline
    "teacher": (_by_scores, "teacher"),     # analysis only: needs a full teacher pass first, saves nothing
    # Half of the kept patches by the student's attention, half uniformly from the rest (docs/real_images.md).
    "mixed": (mixed_selector(attention_share=0.5), "student"),
}


def select_patches(mode: str, *, scores: Optional[torch.Tensor], batch_size: int, num_patches: int,
                   num_keep: int, device: torch.device) -> torch.Tensor:
    """(B, num_keep) kept teacher patch indices for mask criterion ``mode``."""
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask_mode {mode!r}: choose one of {sorted(MASK_MODES) + ['none']}")
    if not 1 <= num_keep <= num_patches:
        raise ValueError(f"num_keep={num_keep} is outside [1, {num_patches}] teacher patches")
    selector, _ = MASK_MODES[mode]
    return selector(scores=scores, batch_size=batch_size, num_patches=num_patches, num_keep=num_keep, device=device)


def check_keep_ratio(keep_ratio: Any) -> None:
    """Refuse a keep_ratio that is not a number: True compares equal to 1.0 (silently unmasked), '0.5' is text."""
    if keep_ratio is not None and (isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real)):
        raise TypeError(f"keep_ratio={keep_ratio!r} must be a number, the fraction of teacher patches kept "
                        f"(e.g. keep_ratio=0.5), not {type(keep_ratio).__name__}")


def resolve_num_keep(*, num_patches: int, keep_ratio: Optional[float], num_keep: Optional[int]) -> int:
    """The teacher patch count to keep, from a ratio or an absolute count (both given must agree)."""
    check_keep_ratio(keep_ratio)
    if keep_ratio is not None and not 0.0 < float(keep_ratio) <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio} is outside (0, 1]: give the fraction of teacher patches to keep, "
                         "e.g. 0.5, or 1.0 to disable masking")
    if num_keep is not None:
        if int(num_keep) != num_keep or not 1 <= int(num_keep) <= num_patches:
            raise ValueError(f"num_keep={num_keep} is outside [1, {num_patches}] (the teacher has {num_patches} "
                             "patches): pass a count in range, or keep_ratio instead")
        num_keep = int(num_keep)
        if keep_ratio is not None and num_keep != _ratio_to_count(keep_ratio, num_patches):
            raise ValueError(f"keep_ratio={keep_ratio} ({_ratio_to_count(keep_ratio, num_patches)} of {num_patches} "
                             f"patches) disagrees with num_keep={num_keep}: pass only one of them")
        return num_keep
    return _ratio_to_count(1.0 if keep_ratio is None else keep_ratio, num_patches)


def _ratio_to_count(keep_ratio: float, num_patches: int) -> int:
    # Round to nearest, never below one patch: 0.5 of 196 is the paper's 98.
    return max(1, min(num_patches, int(round(float(keep_ratio) * num_patches))))


# Keep-ratio warm-up: how far (0 -> 1) the keep ratio has moved from its start (1.0, the full teacher) to the
# target, as a function of the fraction of the warm-up done. A registry, so a new shape is one entry.
KEEP_SCHEDULES: Dict[str, Callable[[float], float]] = {
    "linear": lambda progress: progress,
    "cosine": lambda progress: 0.5 * (1.0 - math.cos(math.pi * progress)),
}


def scheduled_keep_ratio(epoch: int, *, target: float, warmup_epochs: int, shape: str = "linear",
                         start: float = 1.0) -> float:
    """The keep ratio for ``epoch``: ``start`` at epoch 0, annealed to ``target`` at ``warmup_epochs`` and after.

    One value per epoch, so a resumed run recomputes exactly what a straight run used.
    """
    if shape not in KEEP_SCHEDULES:
        raise ValueError(f"unknown keep schedule {shape!r}: choose one of {sorted(KEEP_SCHEDULES)}")
    for name, value in (("target", target), ("start", start)):
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"keep schedule {name}={value} is outside (0, 1]: give a fraction of teacher patches")
    for name, value in (("epoch", epoch), ("warmup_epochs", warmup_epochs)):
        # A negative epoch extrapolated past the start (keep 1.125); a fractional warm-up never lands on the target.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name}={value!r} must be a whole number >= 0"
                             + (" (0: the target from the first epoch)" if name == "warmup_epochs" else ""))
    if epoch >= warmup_epochs:
        return float(target)
    return float(start) + (float(target) - float(start)) * KEEP_SCHEDULES[shape](epoch / warmup_epochs)


def choose_patches(mode: str, *, capture: Optional[Any], batch_size: int, image_hw: Tuple[int, int],
                   grid: Tuple[int, int], num_keep: int, device: torch.device) -> torch.Tensor:
    """(B, num_keep) kept teacher patches for this batch: the capture's scores (if the mode reads any), resampled
    from the scoring model's patch grid onto the teacher's ``grid``, then the mode's selector.

    ``capture`` is an ``AttentionCapture`` (duck-typed: ``take`` and ``score_grid``) that has already seen this
    batch, or None for modes that need no scores. Shared by the DeiT loss and the timm tasks.
    """
    scores = None
    if capture is not None:
        scores = capture.take(batch_size, image_hw=image_hw)
        src = capture.score_grid(scores.shape[1], image_hw)
        scores = resample_scores(scores, src_grid=src, dst_grid=grid)
    return select_patches(mode, scores=scores, batch_size=batch_size, num_patches=grid[0] * grid[1],
                          num_keep=num_keep, device=device)
