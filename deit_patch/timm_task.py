"""MaskedKD for timm's own training script: subclasses of timm's distillation tasks (``timm.task``).

``MaskedLogitDistillationTask`` and ``MaskedTokenDistillationTask`` take exactly the constructor arguments of
timm's ``LogitDistillationTask`` / ``TokenDistillationTask`` plus ``keep_ratio``, ``num_keep`` and ``mask_mode``.
timm's own ``forward`` computes everything (task loss, ``normalize_input``, temperature, loss weights); the only
thing that changes is the module the ``DistillationTeacher`` calls: a ``MaskedTeacher`` (``masked_teacher.py``) that
picks the patches the student attended to (``capture.AttentionCapture``) and runs the teacher on its prefix tokens
plus those patches (``teachers.pruned_forward``). So the teacher input is normalised once, by timm, and with nothing
masked the task is timm's task unchanged.

timm gained ``timm.task`` (``LogitDistillationTask``) in 1.0.23 and ``TokenDistillationTask`` in 1.0.25. On a
timm without them this module still imports (``has_logit_task`` / ``has_token_task`` say so), and the classes are
stubs whose constructor raises ``TimmTaskUnavailable`` naming the timm release that is needed.
"""
from __future__ import annotations

import inspect
import logging
import math
import numbers
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from . import layout
from .layout import unwrap_model
from .cost import SupervisionCost, TokenMeter
from .masked_teacher import MaskedTeacher, check_mask_mode, check_num_keep, check_tau
from .quality import quality_summary

try:
    from timm.task import LogitDistillationTask
    has_logit_task = True
except ImportError:
    has_logit_task = False
try:
    from timm.task import TokenDistillationTask
    has_token_task = True
except ImportError:
    has_token_task = False

_logger = logging.getLogger(__name__)
# our class -> (the timm.task class it extends, the first timm release that has it; read from timm's git tags)
TASK_BASES: Dict[str, Tuple[str, str]] = {
    "MaskedLogitDistillationTask": ("LogitDistillationTask", "1.0.23"),
    "MaskedTokenDistillationTask": ("TokenDistillationTask", "1.0.25"),
}
TASK_STATE_KEY = "maskedkd"


class TimmTaskUnavailable(ImportError):
    """The installed timm has no ``timm.task`` class to extend."""


class TeacherWeightsUnavailable(RuntimeError):
    """timm could not load the weights of a teacher given by name (offline, or a bad path)."""


def timm_task_base(name: str) -> type:
    """The ``timm.task`` class ``name``, or a clear error naming the timm release that introduced it."""
    needed = {base: version for base, version in TASK_BASES.values()}.get(name, "1.0.23")
    try:
        import timm.task as timm_task
    except ImportError as err:
        timm_task, reason = None, f"timm.task cannot be imported ({err})"
    else:
        reason = f"timm.task has no {name}"
    base = getattr(timm_task, name, None) if timm_task is not None else None
    if not isinstance(base, type):
        import timm
        raise TimmTaskUnavailable(
            f"{reason}: this needs timm >= {needed} (installed: timm {getattr(timm, '__version__', '?')} at "
            f"{getattr(timm, '__file__', '?')}). Upgrade with `pip install 'timm>={needed}'`, or, on this timm, "
            "use MaskedDistillationLoss from losses.py in a DeiT-style training loop")
    return base


def weights_error(name: str, path: Optional[str], err: OSError) -> TeacherWeightsUnavailable:
    """The error for a teacher named ``name`` whose weights timm could not load."""
    detail = (str(err).splitlines() or [""])[0][:200] or (f"no file at {path!r}" if path else "")
    return TeacherWeightsUnavailable(
        f"the KD teacher {name!r} could not load its weights ({type(err).__name__}: {detail}): pass an existing "
        "local file as teacher_pretrained_path= (python -m deit_patch.timm_train: --kd-checkpoint FILE) holding the "
        "teacher's weights for your classes; without it timm downloads them from the Hugging Face hub, which needs "
        "internet")


# --- the teacher side: what DistillationTeacher.model becomes --------------------------------------------
class _TeacherCall(nn.Module):
    """Stands in for ``DistillationTeacher.model``: timm calls it with the input it already normalised for the
    teacher (``DistillationTeacher.normalize_input``) and wants logits; the ``MaskedTeacher`` does the rest."""

    def __init__(self, masked_teacher: MaskedTeacher):
        super().__init__()
        self.masked_teacher = masked_teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.masked_teacher(x)[0]


def _student_of(task: nn.Module) -> nn.Module:
    # timm >= 1.0.27 keeps the student as `trainable_module`, 1.0.23 .. 1.0.26 as `student`.
    for name in ("trainable_module", "student"):
        module = task._modules.get(name)
        if module is not None:
            return module
    raise TypeError(f"{type(task).__name__}: the timm task holds no `trainable_module` or `student`; this timm.task "
                    "layout is not one MaskedKD knows")


# --- the task side ----------------------------------------------------------------------------------------
class _MaskedTaskMixin:
    """What both masked tasks add to their timm base: a ``MaskedTeacher`` in place of the teacher module.

    ``task_defaults`` fills constructor arguments the caller leaves out (``configured`` sets it; the CLI uses it to
    inject its flags); ``log_supervision_cost`` logs fvcore's cost table at construction (the CLI turns it on).
    """

    timm_base: type = nn.Module  # the timm.task class extended (set by each task class)
    task_defaults: Dict[str, Any] = {}
    log_supervision_cost: bool = False
    #: log the masked teacher's figures (quality.quality_summary) every this many steps when verbose; 0: never
    log_quality_every: int = 500

    def __init__(self, *args: Any, keep_ratio: Optional[float] = None, num_keep: Optional[int] = None,
                 mask_mode: Optional[str] = None, mask_guard: Optional[str] = None,
                 guard_fallback: Optional[str] = None, probe_every: Optional[int] = None,
                 probe_images: Optional[int] = None, **kwargs: Any):
        # timm's arguments pass through to the timm base unchanged; ours configure the MaskedTeacher.
        masking = dict(keep_ratio=keep_ratio, num_keep=num_keep, mask_mode=mask_mode, mask_guard=mask_guard,
                       guard_fallback=guard_fallback, probe_every=probe_every, probe_images=probe_images)
        given = bind_task_args(type(self), args, kwargs)
        for key, value in type(self).task_defaults.items():
            if key in masking:
                if masking[key] is None:
                    masking[key] = value
            elif key not in given:
                kwargs[key] = value
        _check_numbers(bind_task_args(type(self), args, kwargs))
        try:
            self.timm_base.__init__(self, *args, **kwargs)
        except OSError as err:  # hub download (offline, unknown repo) or a missing local file
            bound = bind_task_args(type(self), args, kwargs)
            if not isinstance(bound.get("teacher_model"), str):
                raise
            raise weights_error(bound["teacher_model"], bound.get("teacher_pretrained_path"), err) from err
        options = {key: value for key, value in masking.items() if value is not None}  # None: the default
        options.setdefault("mask_mode", "attention")
        self._setup_masking(**options)

    def _setup_masking(self, *, mask_mode: str, keep_ratio: Optional[float] = None, num_keep: Optional[int] = None,
                       **monitor: Any) -> None:
        check_mask_mode(mask_mode)
        check_num_keep(num_keep)
        self._quality_steps = 0
        # renorm=None: timm's DistillationTeacher.normalize_input already gives the teacher its own statistics.
        masked = MaskedTeacher(self.teacher.model, student=_student_of(self), keep_ratio=keep_ratio,
                               num_keep=num_keep, mask_mode=mask_mode, **monitor)
        self.teacher_patches = masked.num_patches or 0
        self.masked_teacher: Optional[MaskedTeacher] = None
        if not masked.masking:
            return  # the teacher runs exactly as in timm's task
        self.masked_teacher = masked
        self.teacher.model = _TeacherCall(masked)
        if getattr(self, "verbose", False):
            _logger.info(f"{type(self).__name__}: {self.describe()}")
            if self.log_supervision_cost:
                self._log_cost()

    # --- timm's hooks into the task -----------------------------------------------------------------------
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        if self.masked_teacher is None:
            result = super().forward(input, target)
            result["num_keep"] = self.teacher_patches
            return result
        with self.masked_teacher.labels_for(target):  # timm calls the teacher without them
            result = super().forward(input, target)
        result["num_keep"] = self.masked_teacher.last_step.num_kept
        self._quality_steps += 1
        if getattr(self, "verbose", False) and self.log_quality_every and \
                self._quality_steps % self.log_quality_every == 0:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            _logger.info(f"{type(self).__name__}: {quality_summary(self.pop_stats(all_reduce=distributed))}")
        return result

    def pop_stats(self, *, all_reduce: bool = False) -> Dict[str, float]:
        """The masked teacher's figures since the last call (``MaskedTeacher.pop_stats``), then reset."""
        return self.masked_teacher.pop_stats(all_reduce=all_reduce) if self.masked_teacher is not None else {}

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any):
        # timm's train.py passes device_ids=[device] also on CPU, which DDP refuses for CPU modules: there the
        # ids must be None. (The student hook sits on the unwrapped module, so DDP's wrapper changes nothing.)
        if device_ids and all(isinstance(d, (str, torch.device)) and torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        return super().prepare_distributed(device_ids=device_ids, **ddp_kwargs)

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs: Any):
        result = super().compile(backend=backend, mode=mode, **compile_kwargs)
        if self.masked_teacher is not None:
            # timm just compiled the whole teacher call (the masked teacher included). The mask choice reads the
            # capture's Python-side state, so put the eager call back and compile only the pruned teacher forward.
            self.teacher.model = _TeacherCall(self.masked_teacher)
            self.masked_teacher.compile_pruned(backend=backend, mode=mode, **compile_kwargs)
        return result

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        base = getattr(super(), "get_task_state", None)
        state = dict((base(module=module, ema=ema) if base is not None else None) or {})
        if not ema:  # masking belongs to training, not to the EMA weights
            state[TASK_STATE_KEY] = self._masked_task_state()
        return state

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        state = dict(state or {})
        ours = state.pop(TASK_STATE_KEY, None)
        if ours is not None and not ema:
            self._load_masked_task_state(ours)
        base = getattr(super(), "load_task_state", None)
        if base is not None:
            base(state or None, strict=strict, module=module, ema=ema)

    def _masked_task_state(self) -> Dict[str, Any]:
        masked = self.masked_teacher
        meter = masked.meter if masked is not None else TokenMeter()
        return {"mask_mode": masked.mask_mode if masked is not None else "none",
                "num_keep": masked.num_keep if masked is not None else self.teacher_patches,
                "num_patches": self.teacher_patches, "teacher_images": meter.images,
                "teacher_tokens": meter.tokens, "teacher_tokens_full": meter.tokens_full,
                "guard": masked.guard_state() if masked is not None else None}

    def _load_masked_task_state(self, state: Dict[str, Any]) -> None:
        now = self._masked_task_state()
        changed = [f"{key} {state.get(key)!r} -> {now[key]!r}" for key in ("mask_mode", "num_keep", "num_patches")
                   if state.get(key) != now[key]]
        if changed:
            _logger.warning(f"{type(self).__name__}: the checkpoint was trained with other masking settings "
                            f"({', '.join(changed)}); continuing with the current ones")
        if self.masked_teacher is not None:
            self.masked_teacher.load_guard_state(state.get("guard"))  # a fallback switch survives the resume
            meter = self.masked_teacher.meter
            meter.images = int(state.get("teacher_images", 0))
            meter.tokens = int(state.get("teacher_tokens", 0))
            meter.tokens_full = int(state.get("teacher_tokens_full", 0))

    # --- reporting ----------------------------------------------------------------------------------------
    def describe(self) -> str:
        if self.masked_teacher is None:
            return "teacher sees every patch (unmasked, timm's task unchanged)"
        return (self.masked_teacher.describe() + "; input normalised by timm's "
                "DistillationTeacher.normalize_input")

    def stats(self) -> Dict[str, float]:
        """Teacher tokens processed since the last reset, against the full teacher's (for logs)."""
        meter = self.masked_teacher.meter if self.masked_teacher is not None else TokenMeter()
        return {"teacher_images": meter.images, "teacher_tokens": meter.tokens,
                "teacher_tokens_kept_frac": meter.kept_fraction, "teacher_patch_share": meter.patch_share}

    def supervision_cost(self, *, img_size: Optional[Tuple[int, int]] = None) -> SupervisionCost:
        """fvcore GFLOPs/img of the teacher (full and masked) and the student, at ``img_size`` (default: the
        teacher's built resolution)."""
        masked = self.masked_teacher
        teacher = masked.teacher if masked is not None else self.teacher.model
        if img_size is None:
            img_size = layout.built_image_size(teacher) or layout.probe_image_size(teacher) or (224, 224)
        if masked is None:  # an unmasked view of the same teacher, for the same table
            masked = MaskedTeacher(teacher, keep_ratio=1.0, mask_mode="none")
        return masked.supervision_cost(img_size=img_size, student=unwrap_model(_student_of(self)))

    def _log_cost(self) -> None:
        try:
            table = self.supervision_cost().table()
        except ImportError as err:  # fvcore is optional for a timm user
            _logger.info(f"supervision cost not counted ({err}); `pip install fvcore` for the GFLOPs table")
            return
        _logger.info("MaskedKD supervision cost (fvcore):\n" + table)

    def remove_hooks(self) -> None:
        """Detach the student hook; with it the masked teacher can no longer run, so timm's teacher returns."""
        if self.masked_teacher is not None:
            self.masked_teacher.remove_hooks()
            self.teacher.model = self.masked_teacher.teacher
            self.masked_teacher = None


def _check_numbers(given: Dict[str, Any]) -> None:
    # timm takes these as they come; a NaN weight or temperature would only show as a NaN loss much later.
    for name in ("temperature", "distill_loss_weight", "task_loss_weight"):
        value = given.get(name)
        if value is None:
            continue
        if name == "temperature":
            check_tau(value, name=name)
        elif isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < math.inf:
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")


def bind_task_args(cls: type, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The timm constructor arguments ``args``/``kwargs`` name, by parameter name (``self`` excluded)."""
    try:
        bound = inspect.signature(cls.timm_base.__init__).bind_partial(None, *args, **kwargs).arguments
    except TypeError as err:  # inspect's own message names no class: say whose arguments these are
        raise TypeError(f"{cls.__name__}: {err}; it takes timm's {cls.timm_base.__name__} arguments plus keep_ratio, "
                        "num_keep, mask_mode, mask_guard, guard_fallback, probe_every and probe_images") from None
    bound.pop("self", None)
    return bound


class _Unavailable:
    """A masked task on a timm without the ``timm.task`` class it extends: constructing it says what to install."""

    timm_base_name = "LogitDistillationTask"
    task_defaults: Dict[str, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any):
        timm_task_base(self.timm_base_name)  # raises TimmTaskUnavailable naming the timm release needed
        raise TimmTaskUnavailable(f"{type(self).__name__} was defined when timm had no {self.timm_base_name}; "
                                  "re-import deit_patch.timm_task after upgrading timm")


if has_logit_task:
    class MaskedLogitDistillationTask(_MaskedTaskMixin, LogitDistillationTask):
        """timm's ``LogitDistillationTask`` whose teacher sees only the patches the student attends to.

        Constructor: exactly ``timm.task.LogitDistillationTask``'s arguments, plus
          keep_ratio: fraction of teacher patches kept (default 0.5 with a maskable teacher, 1.0 with any other),
          num_keep: an absolute count instead (98 of 196 in the paper),
          mask_mode: 'attention' (default: the student's last-layer class-token attention), 'random',
            'teacher' (analysis only: an extra full teacher pass) or 'none',
          mask_guard / guard_fallback / probe_every / probe_images: is masking helping? as in ``MaskedTeacher``
            (default: a probe within 1% of the teacher's tokens, and a warning when the chosen mask is markedly
            worse than a random one).
        ``task(input, target)`` returns timm's dict plus ``num_keep`` (teacher patches kept per image this step);
        ``pop_stats()`` the masked teacher's figures (also logged every ``log_quality_every`` steps).
        """

        timm_base = LogitDistillationTask
else:
    class MaskedLogitDistillationTask(_Unavailable):
        """Needs timm >= 1.0.23 (``timm.task.LogitDistillationTask``); this timm has none."""

        timm_base_name = "LogitDistillationTask"


if has_token_task:
    class MaskedTokenDistillationTask(_MaskedTaskMixin, TokenDistillationTask):
        """timm's ``TokenDistillationTask`` (distillation-token students) with a masked teacher.

        Constructor: exactly ``timm.task.TokenDistillationTask``'s arguments plus keep_ratio / num_keep / mask_mode,
        as ``MaskedLogitDistillationTask``. The mask is read from the student's class-token attention.
        ``task(input, target)`` returns timm's dict (its ``distill_loss`` key included) plus ``num_keep``.
        """

        timm_base = TokenDistillationTask
else:
    class MaskedTokenDistillationTask(_Unavailable):
        """Needs timm >= 1.0.25 (``timm.task.TokenDistillationTask``); this timm has none."""

        timm_base_name = "TokenDistillationTask"


MASKED_TASKS: Dict[str, type] = {"LogitDistillationTask": MaskedLogitDistillationTask,
                                 "TokenDistillationTask": MaskedTokenDistillationTask}


def configured(task: type, **defaults: Any) -> type:
    """A subclass of ``task`` whose constructor fills ``defaults`` for the arguments the caller leaves out
    (``keep_ratio``, ``num_keep``, ``mask_mode``, or any timm argument such as ``teacher_pretrained_path``);
    ``log_supervision_cost=True`` logs fvcore's cost table at construction."""
    log_cost = bool(defaults.pop("log_supervision_cost", False))

    class Configured(task):
        task_defaults = {**task.task_defaults, **defaults}
        log_supervision_cost = log_cost

    Configured.__name__ = Configured.__qualname__ = task.__name__
    return Configured


__all__ = ["MASKED_TASKS", "MaskedLogitDistillationTask", "MaskedTokenDistillationTask", "TeacherWeightsUnavailable",
           "TimmTaskUnavailable", "bind_task_args", "configured", "has_logit_task", "has_token_task",
           "timm_task_base"]
