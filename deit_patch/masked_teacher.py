"""``MaskedTeacher``: the teacher side of one distillation step, shared by the DeiT loss and the timm tasks.

``masked_teacher(images) -> (logits, keep_idx)``: it brings the batch to the teacher's input statistics and dtype,
chooses the kept patches (from the student's class-token attention read by a hook, at random, or from the teacher's
own attention), runs the teacher on its prefix tokens plus those patches only, and counts the tokens it processed.
With nothing to mask (a CNN teacher, keep 1.0, ``mask_mode='none'``) it is the unmodified teacher, exactly as DeiT
runs it, and ``keep_idx`` is None.

It owns: keep resolution (ratio or count, per batch resolution, ``set_keep`` for schedules), the criterion, grid
resampling (``masking.choose_patches``), input re-normalisation (``teacher_input.InputRenorm``), the pruned or
compiled forward (``teachers``), token accounting (``cost.TokenMeter``), the fvcore cost and ``describe()``.
It computes no loss.
"""
from __future__ import annotations

import contextlib
import copy
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from . import layout
from .capture import AttentionCapture, CaptureError
from .cost import SupervisionCost, TokenMeter, student_gflops, teacher_gflops
from .masking import MASK_MODES, check_keep_ratio, choose_patches, resolve_num_keep
from .quality import FidelityProbe, MaskGuard, TeacherQuality
from .teacher_input import InputRenorm, TeacherInputError, check_channels, check_resolution
from .layout import unwrap_model
from .teachers import (PrunedTeacher, UnsupportedTeacherError, find_family, pruned_forward, require_family,
                       snap_keep, verify_family)

DEFAULT_KEEP_RATIO = 0.5  # the paper's 98 of 196 patches
# The largest KD temperature the losses take: above it the float32 softened distributions differ by less than
# rounding and the KD term is noise (measured: 0.1% off a float64 reference at 1e3, 5% at 1e4, negative at 1e5,
# NaN once tau^2 overflows).
MAX_TAU = 1e3  # float32 KD against a float64 reference: 0.1% off at 1e3, 5% at 1e4, NaN by 1e20


def check_tau(tau: object, *, name: str = "tau") -> None:
    """A distillation temperature: a real number in (0, MAX_TAU] (NaN fails every comparison, so it lands here)."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < float(tau) <= MAX_TAU:
        raise ValueError(f"{name}={tau!r} must be a finite positive temperature <= {MAX_TAU:g} (DeiT uses 1.0): above "
                         "it the float32 softened distributions differ by less than rounding and the KD term is noise")


class TeacherModeWarning(UserWarning):
    """The teacher was switched to train mode after the loss was built; it is put back in eval mode."""
NO_MASK = "none"


@dataclass(frozen=True)
class TeacherStep:
    """What one teacher call saw: plain ints from shapes (no device sync) and the kept indices (None: every patch)."""
    batch: int
    num_patches: int        # teacher patches at this batch's resolution (0: the teacher has no patch tokens)
    num_kept: int           # patches the teacher processed
    num_prefix: int         # class / distillation / register tokens processed besides the patches
    keep_idx: Optional[torch.Tensor] = None

    @property
    def patch_share(self) -> float:
        """Share of the teacher's patches it processed (prefix tokens not counted)."""
        return self.num_kept / self.num_patches if self.num_patches else 1.0


def check_mask_mode(mask_mode: str) -> None:
    if mask_mode != NO_MASK and mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode={mask_mode!r} is not one of {[NO_MASK] + sorted(MASK_MODES)}")


def check_num_keep(num_keep: Any) -> None:
    if isinstance(num_keep, bool) or (num_keep is not None and not isinstance(num_keep, numbers.Integral)):
        raise TypeError(f"num_keep={num_keep!r} must be an int count of teacher patches (e.g. num_keep=98), "
                        f"not {type(num_keep).__name__}")


def check_models(*, teacher: Any, student: Any, teacher_name: str = "teacher") -> None:
    """Both models must be modules, and two different ones (the teacher is held in eval mode every step)."""
    for name, model in ((teacher_name, teacher), ("student", student)):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be an nn.Module (a built model, plain, DDP-wrapped or compiled), "
                            f"not {type(model).__name__}")
    if teacher is not None and student is not None and unwrap_model(teacher) is unwrap_model(student):
        raise ValueError(f"{teacher_name} is the student itself: the teacher is kept in eval mode, which would switch "
                         "the student out of training; pass a separate teacher (a copy of the student for "
                         "self-distillation)")


def check_settings(*, teacher: Any, student: Any, teacher_dtype: Any, compile_teacher: Any, probe_every: Any,
                   mask_guard: Any) -> None:
    """Refuse, where they enter, objects and flags that would otherwise fail deep in the first step or do nothing."""
    check_models(teacher=teacher, student=student)
    if teacher_dtype is not None and not (isinstance(teacher_dtype, torch.dtype) and teacher_dtype.is_floating_point):
        raise TypeError(f"teacher_dtype={teacher_dtype!r} must be a floating torch.dtype (torch.bfloat16, "
                        "torch.float16) or None for the teacher's own")
    if not isinstance(compile_teacher, bool):  # bool('no') is True: a string would switch compilation on
        raise TypeError(f"compile_teacher={compile_teacher!r} must be True or False")
    if mask_guard == "fallback" and probe_every == 0:
        raise ValueError("mask_guard='fallback' acts on the fidelity probe, which probe_every=0 turns off, so it "
                         "could never act: leave probe_every at None (or a positive interval), or use mask_guard='off'")


def _reference_grid(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The teacher's patch grid as built, or at a size it surely accepts when it has no built size (NaFlexViT);
    None for a teacher without a patch grid we can tell (a CNN, Swin, PVT: unmasked, counted as DeiT runs it)."""
    grid = layout.patch_grid(model)
    if grid is None and layout.is_dynamic_size(model) and layout.probe_image_size(model) is not None:
        grid = layout.patch_grid(model, layout.probe_image_size(model))
    return grid


def _has_patches(model: nn.Module) -> bool:
    return _reference_grid(model) is not None


class MaskedTeacher(nn.Module):
    """A teacher that sees its prefix token(s) plus ``num_keep`` of its patches; ``forward`` -> (logits, keep_idx).

    Args:
        teacher: the teacher model (plain, DDP or compiled); put in eval mode and kept there.
        student: the model whose class-token attention chooses the patches (``mask_mode='attention'``).
        keep_ratio / num_keep: fraction or count of teacher patches kept (not both unless they agree); neither:
            0.5 on a teacher with patch tokens, every patch on a CNN teacher (DeiT's loss).
        mask_mode: 'attention', 'random', 'teacher' (analysis only: an extra full pass) or 'none'.
        renorm: converts the student's input statistics to the teacher's (None: the input is already the teacher's,
            as timm's ``DistillationTeacher.normalize_input`` makes it).
        teacher_dtype: convert the teacher's weights to this dtype in place (the fast path); logits come back float.
        compile_teacher: compile the pruned forward (static shapes: a smaller batch is padded, not recompiled).
        probe_every / probe_images: the fidelity probe (``quality.FidelityProbe``): every ``probe_every`` steps (None:
            as often as 1% of the teacher's tokens allows; 0: never), the full teacher and a random mask of the same
            size on ``probe_images`` images of the batch, as references for the chosen mask.
        mask_guard: what to do when the probes show the chosen mask markedly worse than a random one: 'warn'
            (default), 'fallback' (also switch the run to ``guard_fallback``: 'random' patches at the same keep
            count, or 'full', every patch) or 'off'.
    """

    def __init__(self, teacher: nn.Module, *, student: Optional[nn.Module] = None, keep_ratio: Optional[float] = None,
                 num_keep: Optional[int] = None, mask_mode: str = "attention", renorm: Optional[InputRenorm] = None,
                 teacher_dtype: Optional[torch.dtype] = None, compile_teacher: bool = False,
                 probe_every: Optional[int] = None, probe_images: int = 8, mask_guard: str = "warn",
                 guard_fallback: str = "random"):
        super().__init__()
        check_settings(teacher=teacher, student=student, teacher_dtype=teacher_dtype, compile_teacher=compile_teacher,
                       probe_every=probe_every, mask_guard=mask_guard)
        check_mask_mode(mask_mode)
        check_num_keep(num_keep)
        check_keep_ratio(keep_ratio)
        self.teacher = teacher
        self.renorm = renorm
        self.mask_mode = mask_mode
        self.teacher_dtype = teacher_dtype
        self.compile_teacher = compile_teacher
        self.meter = TokenMeter()
        self.last_step: Optional[TeacherStep] = None
        self.capture: Optional[AttentionCapture] = None
        self.family = None
        self.num_patches = self.num_keep = None
        self.prefix = 0
        self.__dict__["_compiled"] = None  # not a child: the compiled forward shares the teacher's parameters
        self._labels: Optional[torch.Tensor] = None  # set by ``labels_for`` when the caller cannot pass them
        self._warned_train = False
        self._compiled_batch = 0
        self._compile_kwargs: dict = {"dynamic": False}
        self._keep_cache: dict = {}
        # Facts about the teacher's structure, read once: the step only compares shapes against them.
        self._grid_cache: Dict[Tuple[int, int], Optional[Tuple[int, int]]] = {}
        self._in_chans = layout.input_channels(teacher)
        self._plain_prefix = self._unmasked_prefix()
        self.quality = TeacherQuality()
        self.probe = FidelityProbe(every=probe_every, images=probe_images)
        self.guard = MaskGuard(action=mask_guard, fallback=guard_fallback)
        teacher.eval()
        if teacher_dtype is not None:
            teacher.to(dtype=teacher_dtype)
        self._dtype_given = teacher_dtype is not None
        self._input_dtype: Optional[torch.dtype] = None  # the teacher's parameter dtype, which its input must have
        self._follow_teacher_dtype()
        self._resolve_keep(keep_ratio, num_keep)
        if self.masking:
            verify_family(teacher, self.family)  # before any hook: one probe pass, refuses a mis-described teacher
            self.capture = self._build_capture(student)

    def __deepcopy__(self, memo: dict) -> "MaskedTeacher":
        # A copy shares nothing mutable with this one; its compiled forward is rebuilt on first use (a compiled
        # module cannot be copied), and its capture reads the same student (AttentionCapture.__deepcopy__).
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = None if key == "_compiled" else copy.deepcopy(value, memo)
        new._compiled_batch = 0
        return new

    def __reduce_ex__(self, protocol: Any):
        # pickle/torch.save would fail deep inside, on a hook handle or a family's matcher function.
        raise TypeError("a masked teacher (and a distillation loss or timm task holding one) cannot be pickled: it "
                        "is bound to a live student by hooks; checkpoint the models' state_dict() and "
                        "criterion.guard_state() (ViTKD heads: criterion.feature_heads.state_dict()) and rebuild it")

    # --- construction -----------------------------------------------------------------------------------------
    def _resolve_keep(self, keep_ratio: Optional[float], num_keep: Optional[int]) -> None:
        teacher = self.teacher
        family = find_family(teacher)
        if keep_ratio is None and num_keep is None:
            keep_ratio = DEFAULT_KEEP_RATIO if family is not None else 1.0  # a CNN teacher: DeiT's unmasked loss
        masking_asked = self.mask_mode != NO_MASK and not (keep_ratio == 1.0 and num_keep is None)
        if masking_asked:
            family = require_family(teacher)
            if not _has_patches(teacher):  # a registered family whose built grid cannot be told: never mask blind
                raise UnsupportedTeacherError(
                    f"teacher {type(unwrap_model(teacher)).__name__}: its patch grid cannot be told from its patch "
                    "embedding (no grid_size / num_patches that agree), so the kept patches could not be placed: "
                    "use keep_ratio=1.0 (unmasked, as DeiT) or build it with a fixed img_size")
        elif num_keep is not None and not _has_patches(teacher):
            raise ValueError("num_keep needs a teacher with patch tokens")
        self.keep_ratio, self.keep_count = keep_ratio, num_keep  # as asked; resolved per batch resolution
        if _has_patches(teacher):
            # Resolved at the resolution the teacher was built for: validates the request now, and is what the
            # cost table and describe() report.
            rows, cols = _reference_grid(teacher)
            self.num_patches = rows * cols
            self.num_keep = self._resolve_at_built_size(keep_ratio=keep_ratio, num_keep=num_keep)
        else:
            resolve_num_keep(num_patches=1, keep_ratio=keep_ratio, num_keep=None)  # range check only
        # A count on a size-following teacher is judged per batch (keep_for: every patch there runs it unmasked);
        # otherwise it masks unless it keeps every patch of the built grid.
        per_batch = num_keep is not None and layout.is_dynamic_size(teacher)
        if masking_asked and self.num_keep is not None and (per_batch or self.num_keep != self.num_patches):
            self.family = family
            self.prefix = family.num_prefix(unwrap_model(teacher))

    def _resolve_at_built_size(self, *, keep_ratio: Optional[float], num_keep: Optional[int]) -> int:
        """The keep count at the built grid: what the cost table and describe() report, checked now.

        A size-following teacher may meet larger batches than it was built for, so an absolute count there is only
        checked for being a count; keep_for checks it against each batch's real patch count.
        """
        if num_keep is not None and layout.is_dynamic_size(self.teacher):
            return resolve_num_keep(num_patches=max(self.num_patches, int(num_keep)), keep_ratio=None,
                                    num_keep=num_keep)
        return resolve_num_keep(num_patches=self.num_patches, keep_ratio=keep_ratio, num_keep=num_keep)

    def _build_capture(self, student: Optional[nn.Module]) -> Optional[AttentionCapture]:
        source = MASK_MODES[self.mask_mode][1]
        if source == "student":
            if student is None:
                raise ValueError("mask_mode='attention' reads the student's attention: pass student=model "
                                 "(the model whose outputs reach the loss; DDP/compiled wrappers are fine)")
            return AttentionCapture(student)
        if source == "teacher":
            return AttentionCapture(self.teacher, always=True)
        return None

    @property
    def masking(self) -> bool:
        """Whether the teacher runs on a subset of its patches (False: the unmodified teacher)."""
        return self.family is not None

    def train(self, mode: bool = True) -> "MaskedTeacher":
        # The teacher is a fixed target: .train() on anything holding this module never turns its dropout on.
        super().train(mode)
        self.teacher.eval()
        return self

    # --- keep count ---------------------------------------------------------------------------------------------
    def set_keep(self, *, keep_ratio: Optional[float] = None, num_keep: Optional[int] = None) -> None:
        """Change how many teacher patches the following steps keep (one of the two; for keep-ratio schedules).

        Only on a teacher built with masking (the hook and pruning are set up at construction): build it with the
        schedule's target and raise the count from there; ``keep_ratio=1.0`` then runs the full teacher.
        """
        if not self.masking and self.guard.switched is not None:
            # The mask guard switched this run to the full teacher; a keep schedule's next step must not stop the
            # run (it did, with "needs a loss built with masking"). The count is checked and kept, the switch stands.
            check_num_keep(num_keep)
            check_keep_ratio(keep_ratio)
            resolve_num_keep(num_patches=self.num_patches or 1, keep_ratio=keep_ratio, num_keep=num_keep)
            self.keep_ratio, self.keep_count = keep_ratio, num_keep
            return
        if not self.masking:
            raise ValueError("set_keep() needs a loss built with masking (keep_ratio < 1 or num_keep < all patches "
                             "and a mask_mode other than 'none'): build it with the schedule's target keep ratio")
        if (keep_ratio is None) == (num_keep is None):
            raise ValueError("set_keep() takes exactly one of keep_ratio= or num_keep=")
        check_num_keep(num_keep)
        check_keep_ratio(keep_ratio)
        self.num_keep = self._resolve_at_built_size(keep_ratio=keep_ratio, num_keep=num_keep)
        self.keep_ratio, self.keep_count = keep_ratio, num_keep
        self._keep_cache.clear()
        self.__dict__["_compiled"] = None  # a new keep count is a new static shape

    def keep_for(self, image_hw: Tuple[int, int]) -> Tuple[Tuple[int, int], int]:
        """(teacher patch grid, patches kept) for a batch of ``image_hw`` images, at the requested keep."""
        image_hw = (int(image_hw[0]), int(image_hw[1]))
        cached = self._keep_cache.get(image_hw)
        if cached is None:
            check_resolution(self.teacher, image_hw)
            grid = self._grid_at(image_hw)
            if grid is None:
                raise UnsupportedTeacherError(
                    f"teacher {type(unwrap_model(self.teacher)).__name__} has no patch grid at "
                    f"{image_hw[0]}x{image_hw[1]} px (it was built for {layout.built_image_size(self.teacher)}): "
                    "feed it the resolution it was built for, or a teacher built with dynamic_img_size=True")
            patches = grid[0] * grid[1]
            try:
                kept = resolve_num_keep(num_patches=patches, keep_ratio=self.keep_ratio, num_keep=self.keep_count)
            except ValueError as err:
                raise ValueError(f"at {image_hw[0]}x{image_hw[1]} px the teacher has {patches} patches "
                                 f"({grid[0]}x{grid[1]}): {err}") from None
            cached = self._keep_cache[image_hw] = (grid, kept)
        return cached

    # --- one step -------------------------------------------------------------------------------------------------
    def prepare_input(self, images: torch.Tensor) -> torch.Tensor:
        """The batch as the teacher takes it: its channels checked, its statistics and dtype."""
        check_channels(teacher=self.teacher, samples=images, channels=self._in_chans)  # a shape test, no sync
        if not images.is_floating_point():  # raw uint8 pixels would be cast to float below, unnormalised
            raise TeacherInputError(f"the teacher got {images.dtype} images: it takes normalised floating-point "
                                    "images; convert and normalise them in the data pipeline (ToTensor, Normalize)")
        x = self.renorm(images) if self.renorm is not None else images
        # The teacher's own dtype: a half-precision student batch (or a loss moved with .double()) would otherwise
        # fail in the teacher's first convolution; under autocast the ops cast as before.
        return x.to(self._input_dtype) if self._input_dtype is not None and x.dtype != self._input_dtype else x

    def forward(self, images: torch.Tensor, scores: Optional[torch.Tensor] = None, *,
                labels: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(teacher logits, kept patch indices (B, K) or None) for ``images`` in the student's statistics.

        ``scores`` (B, student patches): patch scores to choose from instead of the hooked attention (optional).
        ``labels``: the batch's targets, for the teacher's logged top-1 (class indices, or soft mixup targets).
        """
        if labels is None:
            labels = self._labels
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a (B, C, H, W) tensor, not {type(images).__name__}")
        if images.shape[0] == 0:  # an empty batch: the probe's interval divides by it, every mean would be NaN
            raise ValueError("the teacher got an empty batch (0 images): skip empty batches (e.g. "
                             "DataLoader(drop_last=True)) instead of distilling on them")
        self._keep_eval()
        self._follow_teacher_dtype()
        # bf16 weights: the caller's autocast (fp16 in DeiT) would recast them op by op and, fp16 around a bf16
        # teacher, fail in torch.cat (class token bf16, patch embedding fp16).
        no_autocast = (torch.autocast(device_type=images.device.type, enabled=False)
                       if self.teacher_dtype is not None else contextlib.nullcontext())
        with no_autocast, torch.no_grad():
            logits, keep_idx = self._masked(images, scores, labels) if self.masking else (self._full(images), None)
            self.quality.update(logits, labels)
        return (logits.float() if self.teacher_dtype is not None else logits), keep_idx

    def _keep_eval(self) -> None:
        # The teacher is a fixed target: a teacher.train() made after this was built would turn its dropout on
        # for the rest of the run. Put it back, and say so once.
        if unwrap_model(self.teacher).training:
            if not self._warned_train:
                warnings.warn(f"the teacher ({type(unwrap_model(self.teacher)).__name__}) was put in train mode after "
                              "the distillation loss was built (teacher.train(), or .train() on a module holding "
                              "it); a distillation teacher runs in eval mode, so it is set back to eval for every "
                              "step", TeacherModeWarning, stacklevel=3)
                self._warned_train = True
            self.teacher.eval()

    def _follow_teacher_dtype(self) -> None:
        # A teacher converted by hand (teacher.to(torch.bfloat16)) without teacher_dtype=: feed it its own dtype
        # rather than fail deep in its first layer; the logits still come back as float32.
        param = next(self.teacher.parameters(), None)
        if param is None or not param.is_floating_point():
            return
        self._input_dtype = param.dtype
        wanted = param.dtype if param.dtype in (torch.bfloat16, torch.float16) else None
        if wanted != self.teacher_dtype:
            self.teacher_dtype = wanted
            self._compiled_batch = 0  # a compiled forward traced for another dtype is rebuilt

    def _run_full(self, x: torch.Tensor) -> torch.Tensor:
        """The unmodified teacher on a prepared batch; its output checked to be logits."""
        logits = self.teacher(x)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"teacher {type(unwrap_model(self.teacher)).__name__} returned {type(logits).__name__}, "
                            "not a logits tensor: wrap it in an nn.Module whose forward returns the (batch, classes) "
                            "logits (e.g. output.logits of a Hugging Face model)")
        return logits

    def _full(self, images: torch.Tensor) -> torch.Tensor:
        logits = self._run_full(self.prepare_input(images))
        self._count(images, kept=None, keep_idx=None)
        return logits

    def _masked(self, images: torch.Tensor, scores: Optional[torch.Tensor], labels: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.capture is None and scores is None and MASK_MODES[self.mask_mode][1] is not None:
            raise CaptureError(f"this loss's attention hook was removed by remove_hooks(), so mask_mode="
                               f"{self.mask_mode!r} has no scores: build a new MaskedDistillationLoss to train on")
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        grid, kept = self.keep_for(image_hw)
        batch = images.shape[0]
        if kept == grid[0] * grid[1]:  # a schedule at keep 1.0: the unmodified teacher, exactly as DeiT runs it
            if self.capture is not None and not self.capture.always:
                self.capture.take(batch, image_hw=image_hw)  # consumed, so it can never be reused for another batch
            return self._full(images), None
        x = self.prepare_input(images)
        keep_idx = self._choose(x, scores, batch=batch, image_hw=image_hw, grid=grid, kept=kept)
        patches = grid[0] * grid[1]
        probing = self.probe.due(batch=batch, patches=patches, kept=kept, prefix=self.prefix)
        # The references run before the step's own pruned pass, so what hooks record last (ViTKD's teacher
        # features) is that pass.
        references = self._probe_references(x, patches=patches, kept=kept) if probing else None
        logits = self._run_pruned(x, keep_idx)
        self._count(images, kept=int(keep_idx.shape[1]), keep_idx=keep_idx, grid=grid)
        if references is not None:
            count = references[0].shape[0]
            self._judge(self.probe.record(full=references[0], random=references[1], chosen=logits[:count],
                                          labels=labels[:count] if labels is not None else None))
        return logits, keep_idx

    def _choose(self, x: torch.Tensor, scores: Optional[torch.Tensor], *, batch: int, image_hw: Tuple[int, int],
                grid: Tuple[int, int], kept: int) -> torch.Tensor:
        capture = self.capture
        if scores is not None:
            capture = _GivenScores(scores, grid)
        elif capture is not None and capture.always:
            self.teacher(x)  # 'teacher' mode, analysis only: one extra full teacher pass to read its attention
        keep_idx = choose_patches(self.mask_mode, capture=capture, batch_size=batch, image_hw=image_hw, grid=grid,
                                  num_keep=kept, device=x.device)
        # What the teacher really keeps (Hiera: whole mask units), so keep_idx, the token count and the plots
        # describe the pass that runs.
        return snap_keep(self.teacher, keep_idx, self.family)

    def _run_pruned(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        if self.capture is not None and self.capture.always:
            self.capture.enabled = False  # the pruned pass must not overwrite the teacher's full-pass scores
        try:
            if not self.compile_teacher:
                return pruned_forward(self.teacher, x, keep_idx, self.family)
            return self._compiled_forward(x, keep_idx)
        finally:
            if self.capture is not None:
                self.capture.enabled = True

    def _compiled_forward(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if self.__dict__["_compiled"] is None or batch > self._compiled_batch:
            self.__dict__["_compiled"] = torch.compile(PrunedTeacher(self.teacher), **self._compile_kwargs)
            self._compiled_batch = batch
        pad = self._compiled_batch - batch
        if pad:  # repeat the last sample so the compiled graph keeps its static batch size
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
            keep_idx = torch.cat([keep_idx, keep_idx[-1:].expand(pad, -1)])
        return self.__dict__["_compiled"](x, keep_idx)[:batch]

    # --- is masking helping? (quality.py) ---------------------------------------------------------------------
    def _probe_references(self, x: torch.Tensor, *, patches: int, kept: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The full teacher and the teacher on a random mask of ``kept`` patches, on the batch's first images."""
        few = x[:self.probe.images]
        capture = self.capture if self.capture is not None and self.capture.always else None
        if capture is not None:
            capture.enabled = False  # 'teacher' mode: these passes must not leave scores behind
        try:
            full = self._run_full(few)
            random_idx = self.probe.random_keep(few.shape[0], patches, kept, few.device)
            random = pruned_forward(self.teacher, few, random_idx, self.family)
        finally:
            if capture is not None:
                capture.enabled = True
        extra = few.shape[0] * ((patches + self.prefix) + (kept + self.prefix))
        self.meter.probe_tokens += extra
        return full, random

    def _judge(self, result) -> None:
        if not self.guard.active or self.mask_mode == "random":  # random masks are the reference, not judged
            return
        verdict = self.guard.check(result, reduce=all_reduce_sum)
        if verdict is None:
            return
        self.guard.fired_since_pop = True
        first = self.guard.fired is None
        if first:
            self.guard.fired = verdict
        message = self.guard.message(verdict, mask_mode=self.mask_mode, kept=self.num_keep, patches=self.num_patches)
        if self.guard.action == "fallback":
            self.apply_fallback(reason=verdict)
            self.guard.warn(message)
        elif first:
            self.guard.warn(message)

    def apply_fallback(self, *, reason: Optional[dict] = None, to: Optional[str] = None) -> None:
        """Switch this run to the guard's fallback: random patches at the same keep count, or every patch.

        ``to``: the mask mode a checkpoint recorded switching to ('random' or 'none'); default: this guard's.
        """
        before = self.mask_mode
        if to is None:
            to = "random" if self.guard.fallback == "random" else NO_MASK
        if to not in ("random", NO_MASK):
            raise ValueError(f"the guard state's switch goes to {to!r}, not 'random' or {NO_MASK!r}: pass the dict "
                             "guard_state() returned")
        if to == "random":
            self.mask_mode = "random"
            self.remove_hooks()  # random masks read no scores
        else:
            self.mask_mode = NO_MASK
            self.remove_hooks()
            self.family = None  # the unmodified teacher from now on
        self.guard.switched = {"from": before, "to": self.mask_mode, "at_step": self.probe.steps,
                               "window": dict(reason or {})}

    def guard_state(self) -> dict:
        """What the guard decided (for checkpoints): its settings, the first verdict and any fallback switch."""
        return self.guard.state()

    def load_guard_state(self, state: Optional[dict]) -> None:
        """Restore a checkpoint's guard decisions; a recorded fallback switch is applied again."""
        if not state:
            return
        if not isinstance(state, dict):
            raise TypeError(f"load_guard_state() takes the dict guard_state() returned, not {type(state).__name__}")
        self.guard.fired = state.get("fired")
        switched = state.get("switched")
        if switched and self.guard.switched is None and self.masking:
            # The switch the run made, not what this loss's guard_fallback would choose: a run that fell back to
            # the full teacher must not resume on random masks while its state says 'none'.
            self.apply_fallback(reason=switched.get("window"), to=switched.get("to"))
            self.guard.switched = dict(switched)

    def pop_stats(self, *, all_reduce: bool = False) -> Dict[str, float]:
        """The teacher's figures since the last call, then reset: patch share, prefix tokens, top-1, entropy, the
        probe's comparisons and the guard's state (one host sync; ``all_reduce`` sums over torch.distributed ranks,
        and every rank must then call it)."""
        reduce = all_reduce_sum if all_reduce else (lambda t: t)
        meter = self.meter
        out: Dict[str, float] = {}
        if meter.images:
            out.update(teacher_patch_share=meter.patch_share, teacher_prefix_tokens=meter.prefix_tokens / meter.images,
                       teacher_tokens_per_img=meter.tokens / meter.images)
        out.update(self.quality.pop(reduce))
        if self.masking or self.guard.switched:
            out.update(self.probe.pop(reduce))
            out["mask_guard_fired"] = float(self.guard.fired_since_pop)
            self.guard.fired_since_pop = False
        meter.reset()
        return out

    def compile_pruned(self, **compile_kwargs: Any) -> None:
        """Compile the pruned forward with these ``torch.compile`` arguments (the mask choice stays eager)."""
        self.compile_teacher = True
        self._compile_kwargs = dict(compile_kwargs)
        self.__dict__["_compiled"] = None

    def _count(self, images: torch.Tensor, *, kept: Optional[int], keep_idx: Optional[torch.Tensor],
               grid: Optional[Tuple[int, int]] = None) -> None:
        batch = images.shape[0]
        grid = grid or self._grid_at((int(images.shape[-2]), int(images.shape[-1])))
        if grid is None:  # no patch tokens to count (a CNN, a hierarchical model): counted as DeiT runs it
            step = TeacherStep(batch=batch, num_patches=0, num_kept=0, num_prefix=0)
        else:
            patches = grid[0] * grid[1]
            prefix = self.prefix if self.masking else self._plain_prefix
            step = TeacherStep(batch=batch, num_patches=patches, num_kept=patches if kept is None else kept,
                               num_prefix=prefix, keep_idx=keep_idx)
        self.meter.update(batch=batch, prefix=step.num_prefix, kept=step.num_kept, patches=step.num_patches)
        self.last_step = step

    def _grid_at(self, image_hw: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        if image_hw not in self._grid_cache:  # layout walks the model's attributes: once per resolution
            self._grid_cache[image_hw] = layout.patch_grid(self.teacher, image_hw)
        return self._grid_cache[image_hw]

    def _unmasked_prefix(self) -> int:
        model = unwrap_model(self.teacher)
        family = find_family(model)  # timm < 0.6 distilled ViTs carry 2 prefix tokens and no num_prefix_tokens
        try:
            return family.num_prefix(model) if family is not None else (layout.prefix_tokens(model) or 0)
        except UnsupportedTeacherError:  # prefix tokens that cannot be told only matter to masking: count none
            return 0

    # --- reporting and clean-up -----------------------------------------------------------------------------------
    def supervision_cost(self, *, img_size: Tuple[int, int], student: Optional[nn.Module] = None,
                         feature_heads: float = 0.0) -> SupervisionCost:
        """fvcore GFLOPs/img: the teacher full and at this keep count, the mask choice, the student's forward."""
        if not (isinstance(img_size, (tuple, list)) and len(img_size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in img_size)):
            raise ValueError(f"img_size={img_size!r} must be the input's (height, width) in pixels, e.g. (224, 224)")
        check_models(teacher=self.teacher, student=student)
        teacher = unwrap_model(self.teacher)
        full = teacher_gflops(teacher, img_size=img_size, num_keep=None)
        masked = teacher_gflops(teacher, img_size=img_size, num_keep=self.num_keep) if self.masking else full
        extra = full if self.masking and MASK_MODES[self.mask_mode][1] == "teacher" else 0.0
        s = student_gflops(student, img_size=img_size) if student is not None else 0.0
        patches = self.num_patches or 0
        return SupervisionCost(teacher_full=full, teacher_masked=masked, student_forward=s,
                               num_keep=(self.num_keep or patches) if self.masking else patches, num_patches=patches,
                               extra_teacher=extra, feature_heads=feature_heads)

    def describe(self) -> str:
        if not self.masking:
            line = "teacher sees every patch (unmasked)"
        else:
            line = (f"teacher sees {self.num_keep}/{self.num_patches} patches + {self.prefix} prefix tokens, chosen by "
                    f"mask_mode={self.mask_mode!r} ({self.family.name} teacher)")
        if self.teacher_dtype is not None and not self._dtype_given:
            line += f"; its weights are {self.teacher_dtype} (as converted), so its input is cast to it"
        return line

    @contextlib.contextmanager
    def labels_for(self, labels: Optional[torch.Tensor]) -> Iterator[None]:
        """The batch's labels for calls made inside (timm's task calls the teacher without them)."""
        self._labels = labels
        try:
            yield
        finally:
            self._labels = None

    def remove_hooks(self) -> None:
        """Detach the attention hook; the student is left exactly as it was."""
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    def extra_repr(self) -> str:
        if not self.masking:
            return "unmasked"
        return f"mask_mode={self.mask_mode!r}, num_keep={self.num_keep}/{self.num_patches}, family={self.family.name}"


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over torch.distributed ranks (a copy); ``tensor`` itself outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor


class _GivenScores:
    """Scores handed to ``forward`` directly, in the shape ``choose_patches`` reads from a capture."""

    always = False

    def __init__(self, scores: torch.Tensor, teacher_grid_hw: Tuple[int, int]):
        self.scores, self.grid = scores, teacher_grid_hw

    def take(self, batch_size: int, *, image_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if self.scores.dim() != 2 or self.scores.shape[0] != batch_size:
            raise ValueError(f"scores must be (batch, patches) = ({batch_size}, N), got {tuple(self.scores.shape)}")
        return self.scores

    def score_grid(self, num_patches: int, image_hw: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        if self.grid[0] * self.grid[1] == num_patches:
            return tuple(self.grid)
        side = int(round(num_patches ** 0.5))
        if side * side != num_patches:
            raise ValueError(f"cannot lay {num_patches} scores on a grid: pass one score per teacher patch "
                             f"({self.grid[0]}x{self.grid[1]}) or a square student grid")
        return side, side
