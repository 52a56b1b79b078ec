"""Give the teacher the input it was trained on: its own normalisation statistics and a resolution it accepts.

DeiT's pipeline normalises with ImageNet's mean/std. Many timm teachers (``vit_*.augreg*``, CLIP, EVA) expect
other statistics; fed the student's tensor unchanged they still produce logits, just worse ones. Undoing one
normalisation and applying the other is a per-channel affine map, ``x * scale + shift``, done in one fused op.
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import layout
from .layout import unwrap_model

Stats = Tuple[Tuple[float, ...], Tuple[float, ...]]
IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class TeacherInputError(ValueError):
    """The teacher cannot take the student's input as it is."""


class TeacherStatsWarning(UserWarning):
    """The teacher's input statistics were read from its timm config and may not describe the loaded weights."""


def model_stats(model: Optional[nn.Module]) -> Optional[Stats]:
    """(mean, std) from a timm model's ``pretrained_cfg`` (``default_cfg`` on old timm), or None if it does not say."""
    if model is None:
        return None
    model = unwrap_model(model)
    # timm >= 0.6 keeps them in pretrained_cfg; timm < 0.6 and DeiT's own models in default_cfg.
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return None
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def stats_differ(a: Stats, b: Stats) -> bool:
    """Whether two (mean, std) pairs normalise differently (the one comparison for renorm and the app's check)."""
    return len(a[0]) != len(b[0]) or not all(abs(x - y) < 1e-6 for x, y in zip(a[0] + a[1], b[0] + b[1]))


def resolve_stats(*, mean: Optional[Sequence[float]], std: Optional[Sequence[float]], model: Optional[nn.Module],
                  fallback: Stats, side: str) -> Tuple[Stats, str]:
    """Explicit values win, then the model's pretrained_cfg, then ``fallback``; also says which was used."""
    from_model = model_stats(model)
    if (mean is None) != (std is None) and from_model is None:
        raise TeacherInputError(f"{side}_mean and {side}_std must be given together")
    base, source = (from_model, "pretrained_cfg") if from_model is not None else (fallback, "default")
    if mean is not None or std is not None:
        source = "explicit"
    given_mean = mean if mean is not None else base[0]
    given_std = std if std is not None else base[1]
    try:
        stats = (tuple(float(m) for m in given_mean), tuple(float(s) for s in given_std))
    except (TypeError, ValueError):
        raise TeacherInputError(f"{side}_mean={given_mean!r} / {side}_std={given_std!r} must be sequences of numbers, "
                                "one per channel (e.g. (0.485, 0.456, 0.406))") from None
    # An infinite std maps every input to zero and a NaN mean poisons every logit: both are caught here, by name,
    # instead of surfacing later as a NaN loss blamed on the learning rate.
    if not all(math.isfinite(v) for v in stats[0] + stats[1]):
        raise TeacherInputError(f"{side}_mean={stats[0]} / {side}_std={stats[1]} contain NaN or inf: pass finite "
                                "per-channel statistics (those the model's weights were trained with)")
    if not stats[0] or len(stats[0]) != len(stats[1]) or any(s <= 0 for s in stats[1]):
        raise TeacherInputError(f"{side} statistics {stats} are invalid: mean and std need one value per channel "
                                "and std must be positive")
    return stats, source


class InputRenorm(nn.Module):
    """``x`` normalised with the student's statistics -> the same image normalised with the teacher's.

    x_t = (x * std_s + mean_s - mean_t) / std_t = x * (std_s / std_t) + (mean_s - mean_t) / std_t.
    When the statistics agree the module is the identity and adds no op to the step.
    """

    def __init__(self, *, student: Stats, teacher: Stats, student_source: str = "", teacher_source: str = ""):
        super().__init__()
        if len(student[0]) != len(teacher[0]):
            raise TeacherInputError(f"student statistics have {len(student[0])} channels, teacher's have "
                                    f"{len(teacher[0])}: pass teacher_mean/teacher_std matching the input channels")
        self.student, self.teacher = student, teacher
        self.sources = (student_source, teacher_source)
        self.active = stats_differ(student, teacher)
        mean_s, std_s = (torch.tensor(v).view(1, -1, 1, 1) for v in student)
        mean_t, std_t = (torch.tensor(v).view(1, -1, 1, 1) for v in teacher)
        self.register_buffer("scale", std_s / std_t, persistent=False)
        self.register_buffer("shift", (mean_s - mean_t) / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if x.dim() != 4 or x.shape[1] != self.scale.shape[1]:
            # Broadcasting would silently turn a 1-channel batch into a 3-channel one with per-channel offsets.
            raise TeacherInputError(
                f"the batch has shape {tuple(x.shape)} but the input statistics have {self.scale.shape[1]} channels: "
                f"feed (B, {self.scale.shape[1]}, H, W) images (e.g. convert grayscale to RGB in the data pipeline)")
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))

    def describe(self) -> str:
        def fmt(stats: Stats) -> str:
            return "mean=(" + ", ".join(f"{v:.4g}" for v in stats[0]) + ") std=(" + ", ".join(
                f"{v:.4g}" for v in stats[1]) + ")"
        line = (f"student input {fmt(self.student)} [{self.sources[0]}]; teacher expects {fmt(self.teacher)} "
                f"[{self.sources[1]}]")
        return line + ("; re-normalising the teacher's input" if self.active else "; same statistics, no conversion")


def _caller_level() -> int:
    """``warnings`` stacklevel of the first frame outside the plugin (and torch's module call machinery, which runs
    between a user's ``criterion(...)`` and the plugin's forward), so the warning points at the user's line."""
    plugin = (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "losses.py"),
              str(Path(nn.Module.__call__.__code__.co_filename).resolve().parent))
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(plugin):
        frame, level = frame.f_back, level + 1
    return level


def build_renorm(*, student: Optional[nn.Module], teacher: nn.Module,
                 student_mean=None, student_std=None, teacher_mean=None, teacher_std=None) -> InputRenorm:
    """Statistics for both sides (explicit > pretrained_cfg > ImageNet, DeiT's pipeline) as an ``InputRenorm``."""
    s_stats, s_src = resolve_stats(mean=student_mean, std=student_std, model=student, fallback=IMAGENET_STATS,
                                   side="student")
    # A teacher that does not state its statistics is assumed to share the student's, as in DeiT.
    t_stats, t_src = resolve_stats(mean=teacher_mean, std=teacher_std, model=teacher, fallback=s_stats,
                                   side="teacher")
    renorm = InputRenorm(student=s_stats, teacher=t_stats, student_source=s_src, teacher_source=t_src)
    if renorm.active and t_src == "pretrained_cfg":
        # A model name's config describes timm's hub weights; weights loaded from a file (DeiT's --teacher-path)
        # may have been trained with the student's statistics instead. Measured: a ViT trained on ImageNet
        # statistics and re-normalised to its name's 0.5/0.5 lost 26 points. Only the user knows: say so.
        warnings.warn(
            "re-normalising the teacher's input from the student's statistics to "
            f"{type(unwrap_model(teacher)).__name__}"
            f"'s timm config (mean={t_stats[0]}, std={t_stats[1]}). That is right for timm's own pretrained weights "
            f"and wrong for weights trained with the student's statistics (mean={s_stats[0]}): pass "
            "teacher_mean/teacher_std explicitly (the student's values turn re-normalisation off) to silence this",
            TeacherStatsWarning, stacklevel=_caller_level())
    return renorm


def check_channels(*, teacher: nn.Module, samples: Optional[torch.Tensor] = None,
                   student: Optional[nn.Module] = None, channels: Optional[int] = None) -> None:
    """Refuse a batch (or a student) whose channel count the teacher cannot take, before its forward fails deep.

    ``channels``: the teacher's ``layout.input_channels``, when the caller has it already (every step does).
    """
    expected = channels if channels is not None else layout.input_channels(teacher)
    if expected is None:
        return
    name = type(unwrap_model(teacher)).__name__
    if samples is not None and (samples.dim() != 4 or samples.shape[1] != expected):
        raise TeacherInputError(
            f"teacher {name} takes {expected}-channel images but the batch has shape {tuple(samples.shape)}: feed "
            f"(B, {expected}, H, W) (e.g. convert grayscale to RGB in the data pipeline, or build the teacher with "
            f"in_chans={samples.shape[1] if samples.dim() == 4 else '?'} and weights for it)")
    given = layout.input_channels(student)
    if given is not None and given != expected:
        raise TeacherInputError(
            f"student takes {given}-channel images but teacher {name} takes {expected}: both must see the same "
            f"batch; build them with the same in_chans")


def check_resolution(teacher: nn.Module, image_hw: Tuple[int, int]) -> None:
    """Refuse, with the fix, an input size a fixed-size patch-token teacher would reject deep in its forward."""
    model = unwrap_model(teacher)
    if layout.is_dynamic_size(model):
        return  # dynamic ViTs resample their position embedding themselves
    expected = layout.built_image_size(model)
    patch_embed = getattr(model, "patch_embed", None)
    if expected is None or not getattr(patch_embed, "strict_img_size", True):
        return  # CNNs take any size; a model that does not state one cannot be checked here
    if tuple(expected) != tuple(image_hw):
        raise TeacherInputError(
            f"teacher {type(model).__name__} was built for {tuple(expected)} input but the batch is {tuple(image_hw)}: "
            f"create it at the student's resolution (timm.create_model(..., img_size={image_hw[0]}); its position "
            "embedding is resampled when the checkpoint loads, as main_maskedkd.py does) or with dynamic_img_size=True")
