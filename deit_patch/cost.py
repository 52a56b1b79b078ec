"""What supervision costs: fvcore FLOP counts of the real forwards, and per-step teacher token counters.

GFLOPs follow fvcore's convention (one fused multiply-add counts as one FLOP), the convention in which DeiT-B is
17.6 GFLOPs. fvcore has no handle for ``scaled_dot_product_attention``; without one it silently skips the
attention products, so one is registered here.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import layout
from .layout import unwrap_model
from .teachers import PrunedTeacher


def _shape(value: Any) -> List[int]:
    return list(value.type().sizes())


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """(q k^T) and (attn v): B*H*N*M*D + B*H*N*M*Dv multiply-adds."""
    q, k, v = (_shape(x) for x in inputs[:3])
    *batch, n, d = q
    m, dv = k[-2], v[-1]
    groups = 1
    for size in batch:
        groups *= size
    return Counter({"scaled_dot_product_attention": groups * n * m * (d + dv)})


def count_gflops(module: nn.Module, inputs: Tuple[Any, ...], *, per: int = 1) -> float:
    """fvcore GFLOPs of ``module(*inputs)``, divided by ``per`` (the batch size, for a per-image figure)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import and the tracer warn about things that do not matter here
        from fvcore.nn import FlopCountAnalysis
        analysis = FlopCountAnalysis(module, inputs)
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total() / 1e9 / per


def _probe(model: nn.Module, img_size: Tuple[int, int]) -> torch.Tensor:
    # The channels the model's first convolution takes; 3 (RGB) where that cannot be told.
    param = next(model.parameters())
    channels = layout.input_channels(model) or 3
    return torch.zeros(1, channels, img_size[0], img_size[1], device=param.device, dtype=param.dtype)


def _fixed_keep(num_keep: int, device: torch.device) -> torch.Tensor:
    # FLOPs depend on how many patches are kept, not which.
    return torch.arange(num_keep, device=device).unsqueeze(0)


@torch.no_grad()
def teacher_gflops(teacher: nn.Module, *, img_size: Tuple[int, int], num_keep: Optional[int]) -> float:
    """Teacher GFLOPs per image on the actual pruned forward (``num_keep=None``: the unmodified full forward)."""
    model = unwrap_model(teacher)
    x = _probe(model, img_size)
    was_training = model.training
    model.eval()
    try:
        if num_keep is None:
            return count_gflops(model, (x,))
        return count_gflops(PrunedTeacher(model), (x, _fixed_keep(num_keep, x.device)))
    finally:
        model.train(was_training)


def scheduled_teacher_gflops(teacher: nn.Module, *, img_size: Tuple[int, int], num_keeps: Sequence[int]) -> float:
    """Masked-teacher GFLOPs/img averaged over a run whose epoch ``e`` keeps ``num_keeps[e]`` patches.

    Every epoch sees the same number of images, so the run's per-image cost is the plain mean over epochs; each
    distinct count is traced once.
    """
    if not num_keeps:
        raise ValueError("num_keeps is empty: give the kept patch count of every epoch")
    per_count = {k: teacher_gflops(teacher, img_size=img_size, num_keep=int(k)) for k in set(num_keeps)}
    return sum(per_count[k] for k in num_keeps) / len(num_keeps)


@torch.no_grad()
def student_gflops(student: nn.Module, *, img_size: Tuple[int, int]) -> float:
    """Student forward GFLOPs per image (eval-mode trace, so a distilled student counts one forward)."""
    model = unwrap_model(student)
    was_training = model.training
    model.eval()
    try:
        return count_gflops(model, (_probe(model, img_size),))
    finally:
        model.train(was_training)


@dataclass
class SupervisionCost:
    teacher_full: float          # teacher GFLOPs/img, all patches
    teacher_masked: float        # teacher GFLOPs/img at num_keep (== full when masking is off)
    student_forward: float       # student forward GFLOPs/img
    num_keep: int
    num_patches: int
    extra_teacher: float = 0.0   # GFLOPs/img spent choosing the mask ('teacher' mode runs a full pass first)
    feature_heads: float = 0.0   # GFLOPs/img of trainable feature-distillation heads' forward (ViTKD), 0 without
    teacher_scheduled: Optional[float] = None  # keep-ratio schedule: masked GFLOPs/img averaged over the run's epochs

    @property
    def teacher_per_step(self) -> float:
        masked = self.teacher_masked if self.teacher_scheduled is None else self.teacher_scheduled
        return masked + self.extra_teacher

    @property
    def saving(self) -> float:
        """Fraction of teacher compute saved against the full teacher."""
        return 1.0 - self.teacher_per_step / self.teacher_full if self.teacher_full else 0.0

    @property
    def student_train(self) -> float:
        # forward + backward ~ 3 forwards: the usual accounting for a training step.
        return 3.0 * self.student_forward

    def as_dict(self) -> Dict[str, float]:
        return {"teacher_gflops_full": self.teacher_full, "teacher_gflops_masked": self.teacher_masked,
                "teacher_gflops_mask_choice": self.extra_teacher, "teacher_saving": self.saving,
                "student_gflops_fwd": self.student_forward, "student_gflops_train": self.student_train,
                "num_keep": self.num_keep, "num_patches": self.num_patches,
                "feature_heads_gflops_fwd": self.feature_heads,
                "teacher_gflops_scheduled": self.teacher_scheduled}

    def table(self) -> str:
        rows = [
            ("teacher GFLOPs/img, all patches", f"{self.teacher_full:.3f}"),
            (f"teacher GFLOPs/img, {self.num_keep}/{self.num_patches} patches", f"{self.teacher_masked:.3f}"),
        ]
        if self.teacher_scheduled is not None:
            rows.append(("teacher GFLOPs/img, run average (keep schedule)", f"{self.teacher_scheduled:.3f}"))
        if self.extra_teacher:
            rows.append(("teacher GFLOPs/img choosing the mask", f"{self.extra_teacher:.3f}"))
        rows.append(("teacher compute saved", f"{100 * self.saving:.1f}%"))
        # Trainable heads train like the student (forward + backward ~ 3 forwards) and count as supervision.
        heads_train = 3.0 * self.feature_heads
        if self.feature_heads:
            rows.append(("feature heads GFLOPs/img, training (3x fwd)", f"{heads_train:.3f}"))
        if not self.student_forward:  # not costed: a share of a step without the student's part would read 100%
            return _format_rows(rows + [("student GFLOPs/img", "not costed (pass student=model)")])
        rows += [
            ("student GFLOPs/img, forward", f"{self.student_forward:.3f}"),
            ("student GFLOPs/img, training (3x fwd)", f"{self.student_train:.3f}"),
        ]
        supervision = self.teacher_per_step + heads_train
        rows.append(("supervision share of a step", f"{100 * supervision / (supervision + self.student_train):.1f}%"))
        return _format_rows(rows)


def _format_rows(rows) -> str:
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {value:>10}" for name, value in rows)


@dataclass
class TokenMeter:
    """Teacher tokens processed (prefix + kept patches), against what the full teacher would have processed.

    Plain Python ints from tensor shapes: counting costs no device sync.
    """
    images: int = 0
    tokens: int = 0
    tokens_full: int = 0
    patches_kept: int = 0    # patch tokens only (prefix tokens not counted)
    patches_total: int = 0
    prefix_tokens: int = 0
    probe_tokens: int = 0    # extra tokens the fidelity probe ran (quality.FidelityProbe), not in ``tokens``

    def update(self, *, batch: int, prefix: int, kept: int, patches: int) -> None:
        self.images += batch
        self.tokens += batch * (prefix + kept)
        self.tokens_full += batch * (prefix + patches)
        self.patches_kept += batch * kept
        self.patches_total += batch * patches
        self.prefix_tokens += batch * prefix

    @property
    def kept_fraction(self) -> float:
        """Teacher tokens processed over the full teacher's, prefix tokens included in both."""
        return self.tokens / self.tokens_full if self.tokens_full else 1.0

    @property
    def patch_share(self) -> float:
        """Share of the teacher's patches it processed (0.5 at keep 0.5, whatever the prefix)."""
        return self.patches_kept / self.patches_total if self.patches_total else 1.0

    def reset(self) -> None:
        self.images = self.tokens = self.tokens_full = 0
        self.patches_kept = self.patches_total = self.prefix_tokens = self.probe_tokens = 0
