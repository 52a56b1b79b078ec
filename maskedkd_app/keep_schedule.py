"""``--keep-schedule``: the teacher starts on every patch and its keep ratio anneals to the target.

The schedule's values come from ``deit_patch.masking.scheduled_keep_ratio`` (the plugin owns keep counts); this
module applies one value per epoch to the loss (``MaskedDistillationLoss.set_keep``), reports it for the epoch's
log line, and folds the schedule into the run's supervision cost.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

from deit_patch.cost import SupervisionCost, scheduled_teacher_gflops, teacher_gflops
from deit_patch.masking import resolve_num_keep, scheduled_keep_ratio


class KeepSchedule:
    """Per-epoch keep ratio for a masked loss built at the target keep."""

    def __init__(self, criterion, *, shape: str, warmup_epochs: int, epochs: int, target_ratio: Optional[float],
                 target_count: Optional[int]):
        _require_masking(criterion)
        self.criterion, self.shape, self.warmup_epochs = criterion, shape, int(warmup_epochs)
        patches = criterion.num_patches
        target_count = resolve_num_keep(num_patches=patches, keep_ratio=target_ratio, num_keep=target_count)
        self.target_count = target_count
        self.target_ratio = target_count / patches
        self.ratios = [scheduled_keep_ratio(e, target=self.target_ratio, warmup_epochs=self.warmup_epochs,
                                            shape=shape) for e in range(epochs)]
        # The last warm-up-free epochs use the exact target count (a ratio could round to a neighbour).
        self.counts = [target_count if e >= self.warmup_epochs else
                       resolve_num_keep(num_patches=patches, keep_ratio=r, num_keep=None)
                       for e, r in enumerate(self.ratios)]

    @classmethod
    def from_args(cls, args, criterion) -> Optional["KeepSchedule"]:
        shape = getattr(args, "keep_schedule", "none")
        if shape in (None, "none"):
            return None
        _require_masking(criterion)
        warmup = args.keep_schedule_epochs
        if warmup is None:
            warmup = max(1, args.epochs // 3)
        return cls(criterion, shape=shape, warmup_epochs=warmup, epochs=args.epochs,
                   target_ratio=None if args.num_keep is not None else criterion.masked_teacher.keep_ratio,
                   target_count=args.num_keep)

    def apply(self, epoch: int) -> Dict[str, float]:
        """Set epoch ``epoch``'s keep on the loss; returns what the epoch's log line records."""
        count = self.counts[min(epoch, len(self.counts) - 1)]
        self.criterion.set_keep(num_keep=count)
        return {"keep_ratio": count / self.criterion.num_patches, "teacher_num_keep": count}

    def integrate(self, cost: SupervisionCost, *, teacher, img_size) -> SupervisionCost:
        """The run's cost with the masked teacher's GFLOPs/img averaged over the schedule's epochs."""
        return dataclasses.replace(cost, teacher_scheduled=scheduled_teacher_gflops(
            teacher, img_size=img_size, num_keeps=self.counts))

    def epoch_gflops(self, epoch: int, *, teacher, img_size) -> float:
        count = self.counts[min(epoch, len(self.counts) - 1)]
        cache = self.__dict__.setdefault("_gflops", {})
        if count not in cache:
            cache[count] = teacher_gflops(teacher, img_size=img_size, num_keep=count)
        return cache[count]

    def describe(self) -> str:
        return (f"keep schedule ({self.shape}, {self.warmup_epochs} warm-up epochs): kept teacher patches per epoch "
                f"{self.counts} of {self.criterion.num_patches}")


def _require_masking(criterion) -> None:
    if not getattr(criterion, "masking", False):
        raise ValueError("--keep-schedule anneals the teacher's keep ratio, but this run does not mask the teacher: "
                         "distil from a ViT-family teacher with --keep-ratio below 1 (the target) and a --mask-mode "
                         "other than none, or drop --keep-schedule")
