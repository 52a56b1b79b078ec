"""Distillation losses: DeiT's ``DistillationLoss`` and its drop-in replacement ``MaskedDistillationLoss``.

Both are called exactly as in DeiT: ``loss = criterion(samples, outputs, labels)``. The masked loss shows the
teacher only the patches the student attended to in the forward pass that produced ``outputs``
(MaskedKD, Son et al.), read through a forward hook, so neither model's code changes.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from deit_patch.cost import SupervisionCost, TokenMeter
from deit_patch.features import build_feature_kd, heads_gflops
from deit_patch.layout import unwrap_model
from deit_patch.masked_teacher import (DEFAULT_KEEP_RATIO, MaskedTeacher, TeacherStep, all_reduce_sum,
                                      check_mask_mode, check_models, check_tau)
from deit_patch.teacher_input import build_renorm, check_channels
from deit_patch.teachers import find_family

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
DISTILLATION_TYPES = ("none", "soft", "hard")
KD_REDUCTIONS = ("numel", "batchmean")
# LossStep.terms key -> the name pop_stats reports its per-epoch mean under
LOSS_TERMS = {"base": "loss_base", "kd": "loss_kd", "logit": "loss_logit", "mimic": "loss_vitkd_mimic",
              "generation": "loss_vitkd_gen"}
__all__ = ["DEFAULT_KEEP_RATIO", "DistillationLoss", "LossStep", "MaskedDistillationLoss", "hard_kd", "soft_kd"]


def soft_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tau: float, reduction: str) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, times tau^2.

    'numel' is DeiT's (sum / number of logits); 'batchmean' is the per-sample mean used by the MaskedKD code.
    """
    log_s = F.log_softmax(student_logits.float() / tau, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
    kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True) * (tau * tau)
    return kl / (student_logits.numel() if reduction == "numel" else student_logits.shape[0])


def hard_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's argmax (DeiT's hard distillation)."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))


def split_outputs(outputs: Outputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(class-head logits, distillation-head logits): a plain student's logits serve as both."""
    if isinstance(outputs, torch.Tensor):
        return outputs, outputs
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
        raise TypeError("student outputs must be logits or a (cls_logits, dist_logits) pair, got "
                        f"{type(outputs).__name__}{'' if not isinstance(outputs, (tuple, list)) else len(outputs)}")
    cls_out, dist_out = outputs
    if not (isinstance(cls_out, torch.Tensor) and isinstance(dist_out, torch.Tensor)):
        raise TypeError(f"a (cls_logits, dist_logits) student output must hold two tensors, got "
                        f"({type(cls_out).__name__}, {type(dist_out).__name__})")
    if cls_out.shape != dist_out.shape:
        raise ValueError(f"class-token logits {tuple(cls_out.shape)} and distillation-token logits "
                         f"{tuple(dist_out.shape)} differ: a distilled student returns two heads of one shape")
    return cls_out, dist_out


def _check_finite(**values: object) -> None:
    # NaN slips through every range test (all comparisons with it are False): refuse it where it enters.
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"{name}={value!r} must be a finite number")


def _check_models(base_criterion: object, teacher: object, student: object) -> None:
    # Checked where they enter: a wrong object otherwise fails deep inside the first call ('str' has no 'eval').
    if not callable(base_criterion):
        raise TypeError(f"base_criterion={base_criterion!r} is not callable: pass a loss module such as "
                        "nn.CrossEntropyLoss() (or timm's SoftTargetCrossEntropy() with mixup)")
    check_models(teacher=teacher, student=student, teacher_name="teacher_model")


def check_call(inputs: torch.Tensor, outputs: torch.Tensor, outputs_kd: torch.Tensor, labels: object) -> None:
    """Refuse, naming the problem, a call whose tensors cannot describe one batch of images and its logits."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ValueError(f"samples must be the (B, C, H, W) image batch the student just processed, got "
                         f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
    if inputs.shape[0] == 0:
        raise ValueError("the batch is empty (0 samples): every loss term would be NaN; skip empty batches "
                         "(e.g. DataLoader(drop_last=True)) instead of calling the loss on them")
    for name, logits in (("student outputs", outputs), ("distillation-head outputs", outputs_kd)):
        if logits.dim() != 2 or not logits.is_floating_point():
            raise ValueError(f"{name} must be floating-point (batch, classes) logits, got {logits.dtype} of shape "
                             f"{tuple(logits.shape)}: pass the student's logits, not probabilities or class indices")
    if inputs.shape[0] != outputs.shape[0]:
        raise ValueError(f"the loss got {inputs.shape[0]} samples but {outputs.shape[0]} student outputs: pass "
                         "the samples the student just processed")
    if isinstance(labels, torch.Tensor):
        if labels.dim() == 0 or labels.shape[0] != outputs.shape[0]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the batch of "
                             f"{outputs.shape[0]}: pass one label (or one soft-target row) per sample")
        if labels.dim() == 2 and labels.shape != outputs.shape:
            raise ValueError(f"soft-target labels {tuple(labels.shape)} and student logits {tuple(outputs.shape)} "
                             "have different class counts: build the mixup/cutmix targets with num_classes equal "
                             "to the student's")


def _num_classes(model: nn.Module) -> Optional[int]:
    value = getattr(unwrap_model(model), "num_classes", None)
    return int(value) if isinstance(value, int) else None


def _check_class_counts(student: Optional[nn.Module], teacher: nn.Module) -> None:
    if student is None:
        return
    s, t = _num_classes(student), _num_classes(teacher)
    if s is not None and t is not None and s != t:
        raise ValueError(f"teacher predicts {t} classes but the student {s}: create the teacher with "
                         f"num_classes={s} and weights trained on the student's classes")


class FeatureHeadsWarning(UserWarning):
    """The feature-distillation heads are not being trained (not in the optimizer)."""


@dataclass(frozen=True)
class LossStep:
    """What one loss call produced, for the training loop to read (nothing here syncs with the device)."""
    teacher: Optional[TeacherStep]   # None: no distillation, the teacher did not run
    terms: Dict[str, torch.Tensor]   # detached scalar loss terms on the device: 'base', 'kd', 'mimic', 'generation'

    @property
    def keep_idx(self) -> Optional[torch.Tensor]:
        """(B, K) teacher patches kept this step, or None when the teacher saw every patch."""
        return self.teacher.keep_idx if self.teacher is not None else None


class DistillationLoss(nn.Module):
    """DeiT's distillation loss: base criterion on the class head, KD from the teacher on the distillation head.

    Differences from DeiT, all additive: a student that returns a single Tensor is distilled on those logits;
    ``kd_reduction='batchmean'``; a clear error instead of a wrong value for bad input; and teacher input
    re-normalisation when teacher/student statistics are passed (``MaskedDistillationLoss`` does it by default).
    The teacher runs through a ``MaskedTeacher``; here it never masks, so it is the unmodified teacher.
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: Optional[nn.Module], distillation_type: str,
                 alpha: float, tau: float, *, kd_reduction: str = "numel", student: Optional[nn.Module] = None,
                 teacher_mean: Optional[Sequence[float]] = None, teacher_std: Optional[Sequence[float]] = None,
                 student_mean: Optional[Sequence[float]] = None, student_std: Optional[Sequence[float]] = None,
                 renormalize: Optional[bool] = None):
        super().__init__()
        _check_models(base_criterion, teacher_model, student)
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation_type={distillation_type!r} is not one of {DISTILLATION_TYPES}")
        if kd_reduction not in KD_REDUCTIONS:
            raise ValueError(f"kd_reduction={kd_reduction!r} is not one of {KD_REDUCTIONS}: 'numel' is DeiT's, "
                             "'batchmean' the MaskedKD paper code's")
        if distillation_type != "none" and teacher_model is None:
            raise ValueError(f"distillation_type={distillation_type!r} needs a teacher_model (or use 'none')")
        _check_finite(alpha=alpha)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha={alpha} must lie in [0, 1]: loss = (1 - alpha) * base + alpha * kd")
        check_tau(tau)
        self.base_criterion = base_criterion
        self.distillation_type = distillation_type
        self.alpha, self.tau = float(alpha), float(tau)
        self.kd_reduction = kd_reduction
        self.masked_teacher: Optional[MaskedTeacher] = None
        self.feature_kd: Optional[nn.Module] = None
        self.last_step: Optional[LossStep] = None
        self._term_sums: Optional[torch.Tensor] = None  # LOSS_TERMS and the step count, detached, on the device
        self.__dict__["_idle_teacher"] = teacher_model  # distillation_type='none': kept for callers, never run
        if distillation_type == "none":
            return
        _check_class_counts(student, teacher_model)
        check_channels(teacher=teacher_model, student=student)
        if renormalize is None:
            renormalize = any(v is not None for v in (teacher_mean, teacher_std, student_mean, student_std))
        renorm = None
        if renormalize:
            renorm = build_renorm(student=student, teacher=teacher_model, student_mean=student_mean,
                                  student_std=student_std, teacher_mean=teacher_mean, teacher_std=teacher_std)
        self.masked_teacher = MaskedTeacher(teacher_model, keep_ratio=1.0, mask_mode="none", renorm=renorm)

    @property
    def teacher_model(self) -> Optional[nn.Module]:
        """The teacher as passed in (DeiT's attribute)."""
        return self.masked_teacher.teacher if self.masked_teacher is not None else self.__dict__["_idle_teacher"]

    # --- the call DeiT makes ------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, outputs: Outputs, labels: torch.Tensor) -> torch.Tensor:
        outputs, outputs_kd = split_outputs(outputs)
        if self.distillation_type != "none":  # 'none' is DeiT's base loss alone, whatever the criterion takes
            check_call(inputs, outputs, outputs_kd, labels)
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            self._record(LossStep(teacher=None, terms={"base": base_loss.detach()}))
            return base_loss
        # The teacher: prefix tokens + the patches kept for this batch (all of them when nothing is masked).
        # With feature KD its block outputs are tapped during this same call, so features cost no extra pass.
        with self.feature_kd.tap() if self.feature_kd is not None else contextlib.nullcontext():
            teacher_logits, keep_idx = self.masked_teacher(inputs, labels=labels)
        if teacher_logits.shape != outputs_kd.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(outputs_kd.shape)} differ: teacher and student must predict the same classes")
        if self.distillation_type == "soft":
            kd = soft_kd(outputs_kd, teacher_logits, tau=self.tau, reduction=self.kd_reduction)
        else:
            kd = hard_kd(outputs_kd, teacher_logits)
        loss = base_loss * (1 - self.alpha) + kd * self.alpha
        terms = {"base": base_loss.detach(), "kd": kd.detach(), "logit": loss.detach()}
        if self.feature_kd is not None:  # ViTKD: at the teacher's kept positions when it is masked
            mimic, generation = self.feature_kd(inputs.shape[0], keep_idx=keep_idx)
            self._check_heads_train()
            terms.update(mimic=mimic.detach(), generation=generation.detach())
            loss = loss + mimic + generation
        self._record(LossStep(teacher=self.masked_teacher.last_step, terms=terms))
        return loss

    def _check_heads_train(self) -> None:
        # ViTKD's heads are the loss's own parameters: an optimizer built from the student alone never updates
        # them, and the feature terms then train nothing. On the third call (two optimizer steps after the first),
        # heads that get gradients but have not moved are reported; one host sync, once.
        self._head_calls = getattr(self, "_head_calls", 0) + 1
        if self._head_calls > 3:  # checked once: every later step returns here
            return
        params = [p for p in self.feature_kd.heads.parameters() if p.requires_grad]
        if self._head_calls == 1:
            self._head_sums = torch.stack([p.detach().double().sum() for p in params])
        elif self._head_calls == 3:
            moved = not torch.equal(self._head_sums, torch.stack([p.detach().double().sum() for p in params]))
            grads = [p.grad.detach().abs().sum() for p in params if p.grad is not None]
            graded = bool(torch.stack(grads).sum() > 0) if grads else False  # one sync, not one per parameter
            if graded and not moved:
                warnings.warn("the ViTKD heads (criterion.feature_heads) get gradients but have not changed after two "
                              "steps: they are not in your optimizer, so the feature terms train nothing. Add them: "
                              "for group in criterion.feature_param_groups(weight_decay): "
                              "optimizer.add_param_group(group)", FeatureHeadsWarning, stacklevel=3)

    def _record(self, step: LossStep) -> None:
        # Sums stay on the device; pop_stats reads them once per epoch.
        zero = step.terms["base"].new_zeros((), dtype=torch.float64)
        row = torch.stack([step.terms[k].double() if k in step.terms else zero for k in LOSS_TERMS] + [zero + 1])
        self._term_sums = row if self._term_sums is None else self._term_sums + row
        self.last_step = step

    # --- what the training loop and the user read -------------------------------------------------------------
    @property
    def last_keep_idx(self) -> Optional[torch.Tensor]:
        """(B, K) teacher patches kept by the last call, or None when the teacher saw every patch."""
        return self.last_step.keep_idx if self.last_step is not None else None

    @property
    def meter(self) -> TokenMeter:
        """Teacher tokens processed since the last reset (an empty meter without a teacher)."""
        return self.masked_teacher.meter if self.masked_teacher is not None else TokenMeter()

    def pop_stats(self, *, all_reduce: bool = False) -> Dict[str, float]:
        """Per-epoch figures since the last call, then reset (one host sync): the mean of each loss term
        (``loss_base``, ``loss_kd``, ``loss_logit`` = (1 - alpha) base + alpha kd, ViTKD's ``loss_vitkd_mimic`` and
        ``loss_vitkd_gen``) and the teacher's (``MaskedTeacher.pop_stats``: patch share, prefix tokens, top-1,
        entropy, probe, guard). ``all_reduce``: over torch.distributed ranks (every rank must call it).
        """
        sums, self._term_sums = self._term_sums, None
        out: Dict[str, float] = {}
        if sums is not None:
            if all_reduce:  # outside torch.distributed there is one rank: its sums are the total
                sums = all_reduce_sum(sums)
            *totals, steps = sums.tolist()
            present = set(self.last_step.terms) if self.last_step is not None else set()
            out.update({LOSS_TERMS[k]: total / max(steps, 1.0) for k, total in zip(LOSS_TERMS, totals)
                        if k in present})
        if self.masked_teacher is not None:
            out.update(self.masked_teacher.pop_stats(all_reduce=all_reduce))
        return out

    def stats(self) -> Dict[str, float]:
        """Teacher tokens processed since the last reset (for logs)."""
        meter = self.meter
        return {"teacher_images": meter.images, "teacher_tokens": meter.tokens,
                "teacher_tokens_kept_frac": meter.kept_fraction}

    def _describe_kd(self) -> str:
        line = f"{self.distillation_type} KD, alpha={self.alpha:g}"
        if self.distillation_type == "soft":
            classes = _num_classes(self.teacher_model)
            scale = f"1/{classes}" if classes else "1/classes"
            line += (f", tau={self.tau:g}, kd_reduction={self.kd_reduction!r}: " +
                     (f"the KL sum / (batch x classes), DeiT's; {scale} of 'batchmean' (the MaskedKD paper code's)"
                      if self.kd_reduction == "numel" else "the KL sum / batch, the MaskedKD paper code's"))
        return line

    def describe(self) -> str:
        if self.masked_teacher is None:
            return "no distillation: the teacher never runs"
        lines = [self._describe_kd(), self.masked_teacher.describe()]
        if self.masked_teacher.renorm is not None:
            lines.append(self.masked_teacher.renorm.describe())
        return "\n".join(lines)


class MaskedDistillationLoss(DistillationLoss):
    """``DistillationLoss`` whose teacher sees class token(s) + the ``num_keep`` patches the student attends to.

    mask_mode: 'attention' (the student's last-layer class-token attention, MaskedKD), 'random', 'teacher'
    (analysis only: the teacher's own attention from an extra full pass, saves nothing) or 'none'.
    With keep_ratio=1.0 or mask_mode='none' the teacher runs unmodified, so the value equals DistillationLoss.

    Keep count: ``keep_ratio`` (a fraction of the teacher's patches) or ``num_keep`` (an absolute count), not both
    unless they agree; with neither, 0.5 on a teacher with patch tokens and unmasked on a CNN teacher (as DeiT).
    The count follows each batch's real resolution: a ``dynamic_img_size`` teacher fed 48 px instead of 32 px
    keeps ``keep_ratio`` of its real patch count, and an absolute ``num_keep`` is checked against it.
    ``set_keep`` changes the count between steps (keep-ratio schedules).

    Fast teacher path (opt-in): ``teacher_dtype=torch.bfloat16`` keeps the teacher's weights in bf16 (no casts per
    step) and ``compile_teacher=True`` compiles the pruned forward. The keep count is fixed, so shapes are static;
    a smaller last batch is padded to the compiled batch size instead of triggering a recompile.
    ``teacher_dtype`` converts the teacher module you pass in place: pass a copy if you also use it in fp32.

    Is masking helping? ``pop_stats()`` gives per epoch the masked teacher's top-1 on the training labels and its
    entropy (free), and a fidelity probe's comparison with the full teacher and a random mask of the same size
    (every ``probe_every`` steps on ``probe_images`` images; default: within 1% of the teacher's tokens). When the
    chosen mask is markedly worse than random, ``mask_guard='warn'`` warns (``MaskGuardWarning``) and 'fallback'
    also switches the run to ``guard_fallback`` ('random' patches, or 'full'); ``guard_state()`` is what to
    checkpoint and ``load_guard_state`` restores it (a switch included).

    The loss itself is ``DistillationLoss.forward``; this class only builds a masking ``MaskedTeacher`` and, with
    ``feature_kd='vitkd'``, the ViTKD feature terms.
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: Optional[nn.Module], distillation_type: str,
                 alpha: float, tau: float, *, student: Optional[nn.Module] = None, keep_ratio: Optional[float] = None,
                 num_keep: Optional[int] = None, mask_mode: str = "attention", kd_reduction: str = "numel",
                 teacher_mean: Optional[Sequence[float]] = None, teacher_std: Optional[Sequence[float]] = None,
                 student_mean: Optional[Sequence[float]] = None, student_std: Optional[Sequence[float]] = None,
                 teacher_dtype: Optional[torch.dtype] = None, compile_teacher: bool = False,
                 feature_kd: Optional[str] = None, vitkd_alpha: float = 3e-5, vitkd_beta: float = 3e-6,
                 vitkd_mask_ratio: float = 0.5, vitkd_layers: Sequence[int] = (0, 1),
                 vitkd_generator: Optional[torch.Generator] = None, probe_every: Optional[int] = None,
                 probe_images: int = 8, mask_guard: str = "warn", guard_fallback: str = "random"):
        super().__init__(base_criterion, teacher_model, distillation_type, alpha, tau, kd_reduction=kd_reduction,
                         student=student, teacher_mean=teacher_mean, teacher_std=teacher_std,
                         student_mean=student_mean, student_std=student_std, renormalize=True)
        if feature_kd is not None:
            _check_finite(vitkd_alpha=vitkd_alpha, vitkd_beta=vitkd_beta, vitkd_mask_ratio=vitkd_mask_ratio)
        # ViTKD feature distillation (deit_patch/features.py): its trainable heads are children of this loss.
        family = find_family(teacher_model) if teacher_model is not None else None
        self.feature_kd = build_feature_kd(
            feature_kd, student=student, teacher=teacher_model, distillation_type=distillation_type,
            compile_teacher=compile_teacher, alpha=vitkd_alpha, beta=vitkd_beta, mask_ratio=vitkd_mask_ratio,
            layers=vitkd_layers, generator=vitkd_generator,
            teacher_prefix=family.num_prefix(unwrap_model(teacher_model)) if family is not None else None)
        check_mask_mode(mask_mode)
        self.mask_mode = mask_mode
        if distillation_type == "none":
            return  # the teacher never runs and nothing is hooked
        self.masked_teacher = MaskedTeacher(teacher_model, student=student, keep_ratio=keep_ratio, num_keep=num_keep,
                                            mask_mode=mask_mode, renorm=self.masked_teacher.renorm,
                                            teacher_dtype=teacher_dtype, compile_teacher=compile_teacher,
                                            probe_every=probe_every, probe_images=probe_images,
                                            mask_guard=mask_guard, guard_fallback=guard_fallback)

    # --- the masked teacher's settings, as the loss's (keep-ratio schedules, logs) -----------------------------
    @property
    def masking(self) -> bool:
        return self.masked_teacher is not None and self.masked_teacher.masking

    @property
    def num_keep(self) -> Optional[int]:
        return self.masked_teacher.num_keep if self.masked_teacher is not None else None

    @property
    def num_patches(self) -> Optional[int]:
        return self.masked_teacher.num_patches if self.masked_teacher is not None else None

    def set_keep(self, *, keep_ratio: Optional[float] = None, num_keep: Optional[int] = None) -> None:
        """Change how many teacher patches the following steps keep (see ``MaskedTeacher.set_keep``)."""
        if self.masked_teacher is None:
            raise ValueError("set_keep() needs a loss that distils (distillation_type 'soft' or 'hard') with masking")
        self.masked_teacher.set_keep(keep_ratio=keep_ratio, num_keep=num_keep)

    # --- feature distillation (feature_kd='vitkd') -----------------------------------------------------------
    @property
    def feature_heads(self) -> Optional[nn.Module]:
        """The trainable feature-distillation heads (None without feature_kd): optimise, checkpoint, not EMA."""
        return self.feature_kd.heads if self.feature_kd is not None else None

    def feature_param_groups(self, weight_decay: float) -> list:
        """Optimizer param groups for the heads (decay on weights; none on biases and the mask token)."""
        return self.feature_heads.param_groups(weight_decay) if self.feature_kd is not None else []

    def guard_state(self) -> dict:
        """The mask guard's decisions, for a checkpoint (``MaskedTeacher.guard_state``)."""
        return self.masked_teacher.guard_state() if self.masked_teacher is not None else {}

    def load_guard_state(self, state: Optional[dict]) -> None:
        """Restore a checkpoint's guard decisions; a recorded fallback switch is applied again."""
        if self.masked_teacher is not None:
            self.masked_teacher.load_guard_state(state)

    def remove_hooks(self) -> None:
        """Detach the attention hook (and the feature hooks); the student is left exactly as before."""
        if self.masked_teacher is not None:
            self.masked_teacher.remove_hooks()
        if self.feature_kd is not None:
            self.feature_kd.remove()

    # --- cost and description -------------------------------------------------------------------------------
    def supervision_cost(self, *, img_size: Tuple[int, int], student: Optional[nn.Module] = None) -> SupervisionCost:
        """fvcore GFLOPs/img: teacher full and at this loss's keep count, plus the student's forward."""
        if self.masked_teacher is None:
            raise ValueError("supervision_cost() needs a loss that distils: with distillation_type='none' no teacher "
                             "runs, so there is no supervision to cost")
        heads = 0.0
        if self.feature_kd is not None:  # trainable heads: the aligners see kept tokens only, the generator all
            heads = heads_gflops(self.feature_kd, num_kept=self.num_keep if self.masking else None)
        return self.masked_teacher.supervision_cost(img_size=img_size, student=student, feature_heads=heads)

    def describe(self) -> str:
        lines = [super().describe()]
        if self.feature_kd is not None:
            f = self.feature_kd
            lines.append(f"ViTKD features: blocks {list(f.layers)} mimicked (alpha={f.alpha:g}) and the final norm "
                         f"generated (beta={f.beta:g}, mask ratio {f.mask_ratio:g}), width {f.student_dim} -> "
                         f"{f.teacher_dim}, {sum(p.numel() for p in f.heads.parameters()) / 1e6:.2f}M head params"
                         + (" at the teacher's kept positions" if self.masking else ""))
        return "\n".join(lines)
