"""Distillation losses: DeiT's ``DistillationLoss`` and its drop-in replacement ``MaskedDistillationLoss``.

Both are called exactly as in DeiT: ``loss = criterion(samples, outputs, labels)``. The masked loss shows the
teacher only the patches the student attended to in the forward pass that produced ``outputs``
(MaskedKD, Son et al.), read through a forward hook, so neither model's code changes.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from deit_patch.capture import AttentionCapture, CaptureError, expected_prefix_tokens, unwrap_model
from deit_patch.cost import SupervisionCost, TokenMeter, student_gflops, teacher_gflops
from deit_patch.features import build_feature_kd, heads_gflops
from deit_patch.masking import MASK_MODES, choose_patches, resolve_num_keep
from deit_patch.teacher_input import InputRenorm, build_renorm, check_channels, check_resolution
from deit_patch.teachers import (PrunedTeacher, find_family, pruned_forward, require_family,
                                 teacher_grid, verify_family)

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
DISTILLATION_TYPES = ("none", "soft", "hard")
KD_REDUCTIONS = ("numel", "batchmean")
DEFAULT_KEEP_RATIO = 0.5  # the paper's 98 of 196 patches


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


def _num_classes(model: nn.Module) -> Optional[int]:
    value = getattr(unwrap_model(model), "num_classes", None)
    return int(value) if isinstance(value, int) else None


class DistillationLoss(nn.Module):
    """DeiT's distillation loss: base criterion on the class head, KD from the teacher on the distillation head.

    Differences from DeiT, all additive: a student that returns a single Tensor is distilled on those logits;
    ``kd_reduction='batchmean'``; a clear error instead of a wrong value for bad input; and teacher input
    re-normalisation when teacher/student statistics are passed (``MaskedDistillationLoss`` does it by default).
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: Optional[nn.Module], distillation_type: str,
                 alpha: float, tau: float, *, kd_reduction: str = "numel", student: Optional[nn.Module] = None,
                 teacher_mean: Optional[Sequence[float]] = None, teacher_std: Optional[Sequence[float]] = None,
                 student_mean: Optional[Sequence[float]] = None, student_std: Optional[Sequence[float]] = None,
                 renormalize: Optional[bool] = None):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation_type={distillation_type!r} is not one of {DISTILLATION_TYPES}")
        if kd_reduction not in KD_REDUCTIONS:
            raise ValueError(f"kd_reduction={kd_reduction!r} is not one of {KD_REDUCTIONS}: 'numel' is DeiT's, "
                             "'batchmean' the MaskedKD paper code's")
        if distillation_type != "none" and teacher_model is None:
            raise ValueError(f"distillation_type={distillation_type!r} needs a teacher_model (or use 'none')")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha={alpha} must lie in [0, 1]: loss = (1 - alpha) * base + alpha * kd")
        if not math.isfinite(float(tau)) or float(tau) <= 0:  # NaN passes a `<= 0` test and poisons every step
            raise ValueError(f"tau={tau} must be a finite positive temperature (DeiT uses 1.0)")
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha, self.tau = float(alpha), float(tau)
        self.kd_reduction = kd_reduction
        if distillation_type != "none":
            self._check_class_counts(student, teacher_model)
            check_channels(teacher=teacher_model, student=student)
            teacher_model.eval()
        explicit = any(v is not None for v in (teacher_mean, teacher_std, student_mean, student_std))
        if renormalize is None:
            renormalize = explicit
        self.renorm: Optional[InputRenorm] = None
        if renormalize and teacher_model is not None and distillation_type != "none":
            self.renorm = build_renorm(student=student, teacher=teacher_model, student_mean=student_mean,
                                       student_std=student_std, teacher_mean=teacher_mean, teacher_std=teacher_std)
        self.meter = TokenMeter()

    @staticmethod
    def _check_class_counts(student: Optional[nn.Module], teacher: nn.Module) -> None:
        if student is None:
            return
        s, t = _num_classes(student), _num_classes(teacher)
        if s is not None and t is not None and s != t:
            raise ValueError(f"teacher predicts {t} classes but the student {s}: create the teacher with "
                             f"num_classes={s} and weights trained on the student's classes")

    def train(self, mode: bool = True) -> "DistillationLoss":
        # The teacher is a fixed target: criterion.train() must never put its dropout/BN into training mode.
        super().train(mode)
        if self.teacher_model is not None:
            self.teacher_model.eval()
        return self

    # --- the pieces a subclass changes --------------------------------------------------------------------
    def teacher_input(self, samples: torch.Tensor) -> torch.Tensor:
        check_channels(teacher=self.teacher_model, samples=samples)  # a shape test: no device sync
        return self.renorm(samples) if self.renorm is not None else samples

    def teacher_logits(self, samples: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.teacher_model(self.teacher_input(samples))
        self._count_full(samples)
        return out

    def _count_full(self, samples: torch.Tensor) -> None:
        model = unwrap_model(self.teacher_model)
        if hasattr(model, "patch_embed"):
            patches = teacher_grid(model, tuple(samples.shape[-2:]))
            num = patches[0] * patches[1]
            family = find_family(model)  # timm < 0.6 distilled ViTs carry 2 prefix tokens and no num_prefix_tokens
            prefix = family.num_prefix(model) if family is not None else expected_prefix_tokens(model)
            self.meter.update(batch=samples.shape[0], prefix=prefix, kept=num, patches=num)
        else:
            self.meter.update(batch=samples.shape[0], prefix=0, kept=0, patches=0)

    # --- the call DeiT makes ------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, outputs: Outputs, labels: torch.Tensor) -> torch.Tensor:
        outputs, outputs_kd = self._split(outputs)
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if inputs.shape[0] != outputs.shape[0]:
            raise ValueError(f"the loss got {inputs.shape[0]} samples but {outputs.shape[0]} student outputs: pass "
                             "the samples the student just processed")
        teacher_out = self.teacher_logits(inputs)
        if teacher_out.shape != outputs_kd.shape:
            raise ValueError(f"teacher logits {tuple(teacher_out.shape)} and student logits "
                             f"{tuple(outputs_kd.shape)} differ: teacher and student must predict the same classes")
        if self.distillation_type == "soft":
            kd = soft_kd(outputs_kd, teacher_out, tau=self.tau, reduction=self.kd_reduction)
        else:
            kd = hard_kd(outputs_kd, teacher_out)
        return base_loss * (1 - self.alpha) + kd * self.alpha

    @staticmethod
    def _split(outputs: Outputs) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(outputs, torch.Tensor):
            return outputs, outputs
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise TypeError("student outputs must be logits or a (cls_logits, dist_logits) pair, got "
                            f"{type(outputs).__name__}{'' if not isinstance(outputs, (tuple, list)) else len(outputs)}")
        cls_out, dist_out = outputs
        if cls_out.shape != dist_out.shape:
            raise ValueError(f"class-token logits {tuple(cls_out.shape)} and distillation-token logits "
                             f"{tuple(dist_out.shape)} differ: a distilled student returns two heads of one shape")
        return cls_out, dist_out

    def stats(self) -> Dict[str, float]:
        """Teacher tokens processed since the last reset (for logs)."""
        return {"teacher_images": self.meter.images, "teacher_tokens": self.meter.tokens,
                "teacher_tokens_kept_frac": self.meter.kept_fraction}


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
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: Optional[nn.Module], distillation_type: str,
                 alpha: float, tau: float, *, student: Optional[nn.Module] = None, keep_ratio: Optional[float] = None,
                 num_keep: Optional[int] = None, mask_mode: str = "attention", kd_reduction: str = "numel",
                 teacher_mean: Optional[Sequence[float]] = None, teacher_std: Optional[Sequence[float]] = None,
                 student_mean: Optional[Sequence[float]] = None, student_std: Optional[Sequence[float]] = None,
                 teacher_dtype: Optional[torch.dtype] = None, compile_teacher: bool = False,
                 feature_kd: Optional[str] = None, vitkd_alpha: float = 3e-5, vitkd_beta: float = 3e-6,
                 vitkd_mask_ratio: float = 0.5, vitkd_layers: Sequence[int] = (0, 1),
                 vitkd_generator: Optional[torch.Generator] = None):
        super().__init__(base_criterion, teacher_model, distillation_type, alpha, tau, kd_reduction=kd_reduction,
                         student=student, teacher_mean=teacher_mean, teacher_std=teacher_std,
                         student_mean=student_mean, student_std=student_std, renormalize=True)
        # ViTKD feature distillation (deit_patch/features.py): its trainable heads are children of this loss.
        family = find_family(teacher_model) if teacher_model is not None else None
        self.feature_kd = build_feature_kd(
            feature_kd, student=student, teacher=teacher_model, distillation_type=distillation_type,
            compile_teacher=compile_teacher, alpha=vitkd_alpha, beta=vitkd_beta, mask_ratio=vitkd_mask_ratio,
            layers=tuple(vitkd_layers), generator=vitkd_generator,
            teacher_prefix=family.num_prefix(unwrap_model(teacher_model)) if family is not None else None)
        self._term_sums: Optional[torch.Tensor] = None  # (logit part, mimic, generation), detached, on device
        self._term_steps = 0
        if mask_mode != "none" and mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={mask_mode!r} is not one of {['none'] + sorted(MASK_MODES)}")
        self.mask_mode = mask_mode
        self.last_keep_idx: Optional[torch.Tensor] = None
        self.capture: Optional[AttentionCapture] = None
        self.family = None
        self.num_patches = self.num_keep = None
        self._compiled = None
        self._compiled_batch = 0
        self.teacher_dtype = teacher_dtype
        self.compile_teacher = bool(compile_teacher)
        if distillation_type == "none":
            return  # the teacher never runs and nothing is hooked
        if teacher_dtype is not None:
            teacher_model.to(dtype=teacher_dtype)
        maskable = find_family(teacher_model) is not None
        if keep_ratio is None and num_keep is None:
            keep_ratio = DEFAULT_KEEP_RATIO if maskable else 1.0  # a CNN teacher: DeiT's unmasked loss
        if isinstance(num_keep, bool) or (num_keep is not None and not isinstance(num_keep, numbers.Integral)):
            raise TypeError(f"num_keep={num_keep!r} must be an int count of teacher patches (e.g. num_keep=98), "
                            f"not {type(num_keep).__name__}")
        masking_asked = mask_mode != "none" and not (keep_ratio == 1.0 and num_keep is None)
        if masking_asked:
            self.family = require_family(teacher_model)
        elif num_keep is not None and not hasattr(unwrap_model(teacher_model), "patch_embed"):
            raise ValueError("num_keep needs a teacher with patch tokens")
        self.keep_ratio, self.keep_count = keep_ratio, num_keep  # as asked; resolved per batch resolution
        self._keep_cache: Dict[Tuple[int, int], Tuple[Tuple[int, int], int]] = {}
        if hasattr(unwrap_model(teacher_model), "patch_embed"):
            # Resolved at the resolution the teacher was built for: validates the request now, and is what the
            # cost table and describe() report.
            grid = teacher_grid(teacher_model)
            self.num_patches = grid[0] * grid[1]
            if num_keep is not None and getattr(unwrap_model(teacher_model), "dynamic_img_size", False):
                # A dynamic-size teacher may meet larger batches than it was built for: an absolute count is
                # checked against each batch's real patch count (keep_for), here only for being a count at all.
                self.num_keep = resolve_num_keep(num_patches=max(self.num_patches, int(num_keep)), keep_ratio=None,
                                                 num_keep=num_keep)
            else:
                self.num_keep = resolve_num_keep(num_patches=self.num_patches, keep_ratio=keep_ratio,
                                                 num_keep=num_keep)
        else:
            resolve_num_keep(num_patches=1, keep_ratio=keep_ratio, num_keep=None)  # range check only
        if mask_mode == "none" or self.num_keep is None or self.num_keep == self.num_patches:
            self.family = None  # unmasked: the teacher runs exactly as in DeiT
            return
        verify_family(teacher_model, self.family)  # before any hook: one probe pass, refuses a mis-described teacher
        source = MASK_MODES[mask_mode][1]
        if source == "student":
            if student is None:
                raise ValueError("mask_mode='attention' reads the student's attention: pass student=model "
                                 "(the model whose outputs reach the loss; DDP/compiled wrappers are fine)")
            self.capture = AttentionCapture(student)
        elif source == "teacher":
            self.capture = AttentionCapture(teacher_model, always=True)
        self.prefix = self.family.num_prefix(unwrap_model(teacher_model))

    def set_keep(self, *, keep_ratio: Optional[float] = None, num_keep: Optional[int] = None) -> None:
        """Change how many teacher patches the following steps keep (one of the two; for keep-ratio schedules).

        Only on a loss built with masking (the hook and pruning are set up at construction): build it with the
        schedule's target and raise the count from there; ``keep_ratio=1.0`` then runs the full teacher.
        """
        if not self.masking:
            raise ValueError("set_keep() needs a loss built with masking (keep_ratio < 1 or num_keep < all patches "
                             "and a mask_mode other than 'none'): build it with the schedule's target keep ratio")
        if (keep_ratio is None) == (num_keep is None):
            raise ValueError("set_keep() takes exactly one of keep_ratio= or num_keep=")
        self.num_keep = resolve_num_keep(num_patches=self.num_patches, keep_ratio=keep_ratio, num_keep=num_keep)
        self.keep_ratio, self.keep_count = keep_ratio, num_keep
        self._keep_cache.clear()
        self._compiled = None  # a new keep count is a new static shape

    def keep_for(self, image_hw: Tuple[int, int]) -> Tuple[Tuple[int, int], int]:
        """(teacher patch grid, patches kept) for a batch of ``image_hw`` images, at the requested keep."""
        image_hw = (int(image_hw[0]), int(image_hw[1]))
        cached = self._keep_cache.get(image_hw)
        if cached is None:
            grid = teacher_grid(self.teacher_model, image_hw)
            patches = grid[0] * grid[1]
            try:
                kept = resolve_num_keep(num_patches=patches, keep_ratio=self.keep_ratio, num_keep=self.keep_count)
            except ValueError as err:
                raise ValueError(f"at {image_hw[0]}x{image_hw[1]} px the teacher has {patches} patches "
                                 f"({grid[0]}x{grid[1]}): {err}") from None
            cached = self._keep_cache[image_hw] = (grid, kept)
        return cached

    @property
    def masking(self) -> bool:
        return self.family is not None

    # --- feature distillation (feature_kd='vitkd') -----------------------------------------------------------
    def forward(self, inputs: torch.Tensor, outputs: Outputs, labels: torch.Tensor) -> torch.Tensor:
        if self.feature_kd is None:
            return super().forward(inputs, outputs, labels)
        with self.feature_kd.tap():  # the teacher's features come from the call that gives its logits
            logit_loss = super().forward(inputs, outputs, labels)
        mimic, generation = self.feature_kd(inputs.shape[0], keep_idx=self.last_keep_idx)
        terms = torch.stack([logit_loss.detach().float(), mimic.detach().float(), generation.detach().float()])
        self._term_sums = terms if self._term_sums is None else self._term_sums + terms
        self._term_steps += 1
        return logit_loss + mimic + generation

    @property
    def feature_heads(self) -> Optional[nn.Module]:
        """The trainable feature-distillation heads (None without feature_kd): optimise, checkpoint, not EMA."""
        return self.feature_kd.heads if self.feature_kd is not None else None

    def feature_param_groups(self, weight_decay: float) -> list:
        """Optimizer param groups for the heads (decay on weights; none on biases and the mask token)."""
        return self.feature_heads.param_groups(weight_decay) if self.feature_kd is not None else []

    def pop_loss_terms(self, *, all_reduce: bool = False) -> Dict[str, float]:
        """Mean per step of each loss term since the last call, then reset (one host sync; {} without features).

        ``all_reduce``: average over torch.distributed ranks (every rank must call it).
        """
        if self.feature_kd is None:
            return {}
        device = next(self.feature_kd.heads.parameters()).device
        sums = self._term_sums if self._term_sums is not None else torch.zeros(3, device=device)
        packed = torch.cat([sums.double(), sums.new_tensor([self._term_steps], dtype=torch.float64)])
        if all_reduce:
            torch.distributed.all_reduce(packed)
        self._term_sums, self._term_steps = None, 0
        logit, mimic, generation, steps = packed.tolist()
        steps = max(steps, 1.0)
        return {"loss_logit": logit / steps, "loss_vitkd_mimic": mimic / steps, "loss_vitkd_gen": generation / steps}

    def remove_hooks(self) -> None:
        """Detach the attention hook (and the feature hooks); the student is left exactly as before."""
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        if self.feature_kd is not None:
            self.feature_kd.remove()

    def teacher_input(self, samples: torch.Tensor) -> torch.Tensor:
        x = super().teacher_input(samples)
        return x.to(self.teacher_dtype) if self.teacher_dtype is not None else x

    def teacher_logits(self, samples: torch.Tensor) -> torch.Tensor:
        if self.teacher_dtype is None:
            return self._teacher_logits(samples)
        # The weights already hold teacher_dtype: the caller's autocast (fp16 in DeiT) would recast them op by op
        # and, fp16 around a bf16 teacher, fail in torch.cat (class token bf16, patch embedding fp16).
        with torch.autocast(device_type=samples.device.type, enabled=False):
            return self._teacher_logits(samples)

    def _teacher_logits(self, samples: torch.Tensor) -> torch.Tensor:
        if not self.masking:
            self.last_keep_idx = None
            out = super().teacher_logits(samples)
            return out.float() if self.teacher_dtype is not None else out
        if self.capture is None and MASK_MODES[self.mask_mode][1] is not None:
            raise CaptureError(f"this loss's attention hook was removed by remove_hooks(), so mask_mode="
                               f"{self.mask_mode!r} has no scores: build a new MaskedDistillationLoss to train on")
        image_hw = (int(samples.shape[-2]), int(samples.shape[-1]))
        check_resolution(self.teacher_model, image_hw)
        grid, kept = self.keep_for(image_hw)
        batch, patches = samples.shape[0], grid[0] * grid[1]
        if kept == patches:  # a schedule at keep 1.0: the unmodified teacher, exactly as DeiT runs it
            if self.capture is not None and not self.capture.always:
                self.capture.take(batch, image_hw=image_hw)  # consumed, so it can never be reused for another batch
            self.last_keep_idx = None
            out = DistillationLoss.teacher_logits(self, samples)
            return out.float() if self.teacher_dtype is not None else out
        with torch.no_grad():
            x = self.teacher_input(samples)
            keep_idx = self._keep_indices(x, batch, image_hw=image_hw, grid=grid, kept=kept)
            logits = self._run_pruned(x, keep_idx)
        self.last_keep_idx = keep_idx
        self.meter.update(batch=batch, prefix=self.prefix, kept=kept, patches=patches)
        return logits.float() if self.teacher_dtype is not None else logits

    def _keep_indices(self, x: torch.Tensor, batch: int, *, image_hw: Tuple[int, int], grid: Tuple[int, int],
                      kept: int) -> torch.Tensor:
        if self.capture is not None and self.capture.always:
            self.teacher_model(x)  # 'teacher' mode, analysis only: one extra full teacher pass to read its attention
        return choose_patches(self.mask_mode, capture=self.capture, batch_size=batch, image_hw=image_hw, grid=grid,
                              num_keep=kept, device=x.device)

    def _run_pruned(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        if self.capture is not None and self.capture.always:
            self.capture.enabled = False  # the pruned pass must not overwrite the teacher's full-pass scores
        try:
            if not self.compile_teacher:
                return pruned_forward(self.teacher_model, x, keep_idx, self.family)
            return self._compiled_forward(x, keep_idx)
        finally:
            if self.capture is not None:
                self.capture.enabled = True

    def _compiled_forward(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if self._compiled is None or batch > self._compiled_batch:
            self._compiled = torch.compile(PrunedTeacher(self.teacher_model), dynamic=False)
            self._compiled_batch = batch
        pad = self._compiled_batch - batch
        if pad:  # repeat the last sample so the compiled graph keeps its static batch size
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
            keep_idx = torch.cat([keep_idx, keep_idx[-1:].expand(pad, -1)])
        return self._compiled(x, keep_idx)[:batch]

    def supervision_cost(self, *, img_size: Tuple[int, int], student: Optional[nn.Module] = None) -> SupervisionCost:
        """fvcore GFLOPs/img: teacher full and at this loss's keep count, plus the student's forward."""
        teacher = unwrap_model(self.teacher_model)
        full = teacher_gflops(teacher, img_size=img_size, num_keep=None)
        masked = teacher_gflops(teacher, img_size=img_size, num_keep=self.num_keep) if self.masking else full
        extra = full if self.masking and MASK_MODES[self.mask_mode][1] == "teacher" else 0.0
        s = student_gflops(student, img_size=img_size) if student is not None else 0.0
        patches = self.num_patches or 0
        heads = 0.0
        if self.feature_kd is not None:  # trainable heads: the aligners see kept tokens only, the generator all
            heads = heads_gflops(self.feature_kd, num_kept=self.num_keep if self.masking else None)
        return SupervisionCost(teacher_full=full, teacher_masked=masked, student_forward=s,
                               num_keep=self.num_keep or patches, num_patches=patches, extra_teacher=extra,
                               feature_heads=heads)

    def describe(self) -> str:
        if self.distillation_type == "none":
            return "no distillation: the teacher never runs"
        lines = []
        if self.masking:
            lines.append(f"teacher sees {self.num_keep}/{self.num_patches} patches + {self.prefix} prefix tokens, "
                         f"chosen by mask_mode={self.mask_mode!r} ({self.family.name} teacher)")
        else:
            lines.append("teacher sees every patch (unmasked)")
        if self.renorm is not None:
            lines.append(self.renorm.describe())
        if self.feature_kd is not None:
            f = self.feature_kd
            lines.append(f"ViTKD features: blocks {list(f.layers)} mimicked (alpha={f.alpha:g}) and the final norm "
                         f"generated (beta={f.beta:g}, mask ratio {f.mask_ratio:g}), width {f.student_dim} -> "
                         f"{f.teacher_dim}, {sum(p.numel() for p in f.heads.parameters()) / 1e6:.2f}M head params"
                         + (" at the teacher's kept positions" if self.masking else ""))
        return "\n".join(lines)
