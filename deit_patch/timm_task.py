"""MaskedKD for timm's own training script: subclasses of timm's distillation tasks (``timm.task``).

``MaskedLogitDistillationTask`` and ``MaskedTokenDistillationTask`` take exactly the constructor arguments of
timm's ``LogitDistillationTask`` / ``TokenDistillationTask`` plus ``keep_ratio``, ``num_keep`` and ``mask_mode``.
timm's own ``forward`` computes everything (task loss, ``normalize_input``, temperature, loss weights); the only
thing that changes is the module the ``DistillationTeacher`` calls: a ``TeacherMasker`` that picks the patches the
student attended to (``capture.AttentionCapture``) and runs the teacher on its prefix tokens plus those patches
(``teachers.pruned_forward``). So the teacher input is normalised once, by timm, and with nothing masked the task
is timm's task unchanged.

timm gained ``timm.task`` (``LogitDistillationTask``) in 1.0.23 and ``TokenDistillationTask`` in 1.0.25. This
module imports ``timm.task`` only when one of the classes is first used, so it imports fine on any timm; using a
class on a timm without it raises ``TimmTaskUnavailable`` saying which timm is needed.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .capture import AttentionCapture, unwrap_model
from .cost import SupervisionCost, TokenMeter, student_gflops, teacher_gflops
from .masking import MASK_MODES, choose_patches, resolve_num_keep
from .teacher_input import check_resolution
from .teachers import PrunedTeacher, TeacherFamily, find_family, pruned_forward, require_family, teacher_grid

_logger = logging.getLogger(__name__)

DEFAULT_KEEP_RATIO = 0.5  # the paper's 98 of 196 patches
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
class TeacherMasker(nn.Module):
    """Stands in for ``DistillationTeacher.model``: chooses the kept patches, then runs the pruned teacher.

    timm calls it with the input it already normalised for the teacher (``DistillationTeacher.normalize_input``),
    right after the student's forward whose class-token attention the capture recorded.
    """

    def __init__(self, teacher: nn.Module, *, student: nn.Module, family: TeacherFamily, mask_mode: str,
                 keep_ratio: Optional[float], num_keep: Optional[int]):
        super().__init__()
        self.teacher = teacher  # what DistillationTeacher held: plain, or compiled (pruning unwraps to the module)
        self.family = family
        self.mask_mode = mask_mode
        self.keep_ratio, self.keep_count = keep_ratio, num_keep
        grid = teacher_grid(teacher)
        self.num_patches = grid[0] * grid[1]
        self.num_keep = resolve_num_keep(num_patches=self.num_patches, keep_ratio=keep_ratio, num_keep=num_keep)
        self.prefix = family.num_prefix(unwrap_model(teacher))
        source = MASK_MODES[mask_mode][1]
        self.capture: Optional[AttentionCapture] = None
        if source == "student":
            self.capture = AttentionCapture(student)
        elif source == "teacher":
            self.capture = AttentionCapture(teacher, always=True)
        self.meter = TokenMeter()
        self.last_keep_idx: Optional[torch.Tensor] = None
        self.last_num_keep = self.num_keep
        # Not registered as a submodule: the compiled pruned forward shares the teacher's parameters.
        self.__dict__["_compiled"] = None

    def keep_for(self, grid: Tuple[int, int]) -> int:
        """Patches kept on a ``grid`` teacher grid (the built one unless the teacher resizes dynamically)."""
        patches = grid[0] * grid[1]
        if patches == self.num_patches:
            return self.num_keep
        return resolve_num_keep(num_patches=patches, keep_ratio=self.keep_ratio, num_keep=self.keep_count)

    def compile_pruned(self, **compile_kwargs: Any) -> None:
        """Compile the pruned forward (not the mask choice, which reads the capture's Python-side state)."""
        self.__dict__["_compiled"] = torch.compile(PrunedTeacher(self.teacher), **compile_kwargs)

    @property
    def compiled(self) -> bool:
        return self.__dict__["_compiled"] is not None

    def remove_hooks(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image_hw = (int(x.shape[-2]), int(x.shape[-1]))
        check_resolution(self.teacher, image_hw)
        grid = teacher_grid(self.teacher, image_hw)
        num_keep = self.keep_for(grid)
        batch = x.shape[0]
        if self.capture is not None and self.capture.always:
            self.teacher(x)  # 'teacher' mode, analysis only: a full pass to read the teacher's own attention
        # The student saw the same pixels (normalize_input only rescales values), so the same resolution.
        keep_idx = choose_patches(self.mask_mode, capture=self.capture, batch_size=batch, image_hw=image_hw,
                                  grid=grid, num_keep=num_keep, device=x.device)
        if self.capture is not None and self.capture.always:
            self.capture.enabled = False  # the pruned pass must not overwrite the full pass's scores
        try:
            compiled = self.__dict__["_compiled"]
            logits = compiled(x, keep_idx) if compiled is not None else pruned_forward(self.teacher, x, keep_idx,
                                                                                       self.family)
        finally:
            if self.capture is not None:
                self.capture.enabled = True
        self.last_keep_idx, self.last_num_keep = keep_idx, num_keep
        self.meter.update(batch=batch, prefix=self.prefix, kept=num_keep, patches=grid[0] * grid[1])
        return logits

    def extra_repr(self) -> str:
        return f"mask_mode={self.mask_mode!r}, num_keep={self.num_keep}/{self.num_patches}, family={self.family.name}"


# --- the task side ----------------------------------------------------------------------------------------
def _student_of(task: nn.Module) -> nn.Module:
    # timm >= 1.0.27 keeps the student as `trainable_module`, 1.0.23 .. 1.0.26 as `student`.
    for name in ("trainable_module", "student"):
        module = task._modules.get(name)
        if module is not None:
            return module
    raise TypeError(f"{type(task).__name__}: the timm task holds no `trainable_module` or `student`; this timm.task "
                    "layout is not one MaskedKD knows")


def _check_mask_mode(mask_mode: str) -> None:
    if mask_mode != "none" and mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode={mask_mode!r} is not one of {['none'] + sorted(MASK_MODES)}")


class _MaskedTaskMixin:
    """What both masked tasks add to their timm base. Set up by ``_setup_masking`` after the base's __init__."""

    #: extra constructor defaults (set by ``configured``; the CLI uses it to inject its flags)
    task_defaults: Dict[str, Any] = {}
    #: log fvcore's supervision-cost table at construction (the CLI turns it on)
    log_supervision_cost: bool = False

    def _setup_masking(self, *, keep_ratio: Optional[float], num_keep: Optional[int], mask_mode: str) -> None:
        _check_mask_mode(mask_mode)
        if isinstance(num_keep, bool) or (num_keep is not None and int(num_keep) != num_keep):
            raise TypeError(f"num_keep={num_keep!r} must be an int count of teacher patches (e.g. num_keep=98)")
        teacher = self.teacher.model
        family = find_family(teacher)
        if keep_ratio is None and num_keep is None:
            keep_ratio = DEFAULT_KEEP_RATIO if family is not None else 1.0  # a CNN teacher: unmasked, as timm
        self.mask_mode = mask_mode
        self.masker: Optional[TeacherMasker] = None
        self.teacher_patches = teacher_grid(teacher)[0] * teacher_grid(teacher)[1] if hasattr(
            unwrap_model(teacher), "patch_embed") else 0
        wants_masking = mask_mode != "none" and not (float(keep_ratio or 1.0) == 1.0 and num_keep is None)
        if not wants_masking:
            resolve_num_keep(num_patches=max(1, self.teacher_patches), keep_ratio=keep_ratio, num_keep=None)
            return  # the teacher runs exactly as in timm's task
        family = require_family(teacher)  # a clear error for a teacher without patch tokens
        masker = TeacherMasker(teacher, student=_student_of(self), family=family, mask_mode=mask_mode,
                               keep_ratio=keep_ratio, num_keep=num_keep)
        if masker.num_keep == masker.num_patches:
            masker.remove_hooks()
            return  # every patch kept: nothing to prune
        self.masker = masker
        self.teacher.model = masker
        if getattr(self, "verbose", False):
            _logger.info(f"{type(self).__name__}: {self.describe()}")
            if self.log_supervision_cost:
                self._log_cost()

    # --- timm's hooks into the task -----------------------------------------------------------------------
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        result = super().forward(input, target)
        result["num_keep"] = self.masker.last_num_keep if self.masker is not None else self.teacher_patches
        return result

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any):
        # timm's train.py passes device_ids=[device] also on CPU, which DDP refuses for CPU modules: there the
        # ids must be None. (The student hook sits on the unwrapped module, so DDP's wrapper changes nothing.)
        if device_ids and all(isinstance(d, (str, torch.device)) and torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        return super().prepare_distributed(device_ids=device_ids, **ddp_kwargs)

    def _compile_masked(self, compile_base: Callable[..., Any], backend: str, mode: Optional[str],
                        compile_kwargs: Dict[str, Any]) -> Any:
        result = compile_base(backend=backend, mode=mode, **compile_kwargs)
        if self.masker is not None:
            # timm just compiled the whole teacher call (our masker included). The mask choice reads Python-side
            # capture state, so put the eager masker back and compile only the pruned teacher forward.
            self.teacher.model = self.masker
            self.masker.compile_pruned(backend=backend, mode=mode, **compile_kwargs)
        return result

    def _masked_task_state(self) -> Dict[str, Any]:
        meter = self.masker.meter if self.masker is not None else TokenMeter()
        return {"mask_mode": self.mask_mode if self.masker is not None else "none",
                "num_keep": self.masker.num_keep if self.masker is not None else self.teacher_patches,
                "num_patches": self.teacher_patches, "teacher_images": meter.images,
                "teacher_tokens": meter.tokens, "teacher_tokens_full": meter.tokens_full}

    def _load_masked_task_state(self, state: Dict[str, Any]) -> None:
        now = self._masked_task_state()
        changed = [f"{key} {state.get(key)!r} -> {now[key]!r}" for key in ("mask_mode", "num_keep", "num_patches")
                   if state.get(key) != now[key]]
        if changed:
            _logger.warning(f"{type(self).__name__}: the checkpoint was trained with other masking settings "
                            f"({', '.join(changed)}); continuing with the current ones")
        if self.masker is not None:
            meter = self.masker.meter
            meter.images = int(state.get("teacher_images", 0))
            meter.tokens = int(state.get("teacher_tokens", 0))
            meter.tokens_full = int(state.get("teacher_tokens_full", 0))

    # --- reporting ----------------------------------------------------------------------------------------
    def describe(self) -> str:
        if self.masker is None:
            return "teacher sees every patch (unmasked, timm's task unchanged)"
        m = self.masker
        return (f"teacher sees {m.num_keep}/{m.num_patches} patches + {m.prefix} prefix tokens, chosen by "
                f"mask_mode={m.mask_mode!r} ({m.family.name} teacher); input normalised by timm's "
                "DistillationTeacher.normalize_input")

    def stats(self) -> Dict[str, float]:
        """Teacher tokens processed since the last reset, against the full teacher's (for logs)."""
        meter = self.masker.meter if self.masker is not None else TokenMeter()
        return {"teacher_images": meter.images, "teacher_tokens": meter.tokens,
                "teacher_tokens_kept_frac": meter.kept_fraction}

    def supervision_cost(self, *, img_size: Optional[Tuple[int, int]] = None) -> SupervisionCost:
        """fvcore GFLOPs/img of the teacher (full and masked) and the student, at ``img_size`` (default: the
        teacher's built resolution)."""
        teacher = unwrap_model(self.masker.teacher if self.masker is not None else self.teacher.model)
        if img_size is None:
            img_size = tuple(getattr(getattr(teacher, "patch_embed", None), "img_size", None) or (224, 224))
        full = teacher_gflops(teacher, img_size=img_size, num_keep=None)
        masked = teacher_gflops(teacher, img_size=img_size, num_keep=self.masker.num_keep) if self.masker else full
        extra = full if self.masker is not None and MASK_MODES[self.mask_mode][1] == "teacher" else 0.0
        student = unwrap_model(_student_of(self))
        return SupervisionCost(teacher_full=full, teacher_masked=masked,
                               student_forward=student_gflops(student, img_size=img_size),
                               num_keep=self.masker.num_keep if self.masker else self.teacher_patches,
                               num_patches=self.teacher_patches, extra_teacher=extra)

    def _log_cost(self) -> None:
        try:
            table = self.supervision_cost().table()
        except ImportError as err:  # fvcore is optional for a timm user
            _logger.info(f"supervision cost not counted ({err}); `pip install fvcore` for the GFLOPs table")
            return
        _logger.info("MaskedKD supervision cost (fvcore):\n" + table)

    def remove_hooks(self) -> None:
        """Detach the student hook; with it the masked teacher can no longer run, so timm's teacher returns."""
        if self.masker is not None:
            self.masker.remove_hooks()
            self.teacher.model = self.masker.teacher
            self.masker = None


def _signature_with_masking(base: type) -> inspect.Signature:
    params = [p for p in inspect.signature(base.__init__).parameters.values() if p.kind != p.VAR_KEYWORD]
    kw = inspect.Parameter.KEYWORD_ONLY
    extra = [inspect.Parameter("keep_ratio", kw, default=None, annotation="Optional[float]"),
             inspect.Parameter("num_keep", kw, default=None, annotation="Optional[int]"),
             inspect.Parameter("mask_mode", kw, default=None, annotation="Optional[str]")]
    return inspect.Signature(params + extra)


def _build_task_class(name: str) -> type:
    base_name, _ = TASK_BASES[name]
    base = timm_task_base(base_name)
    base_params = inspect.signature(base.__init__)

    def __init__(self, *args: Any, keep_ratio: Optional[float] = None, num_keep: Optional[int] = None,
                 mask_mode: Optional[str] = None, **kwargs: Any) -> None:
        # Defaults from `configured` fill only what the caller left out (by position or by name).
        given = base_params.bind_partial(self, *args, **kwargs).arguments
        masking = {"keep_ratio": keep_ratio, "num_keep": num_keep, "mask_mode": mask_mode}
        for key, value in type(self).task_defaults.items():
            if key in masking:
                if masking[key] is None:
                    masking[key] = value
            elif key not in given:
                kwargs[key] = value
        try:
            base.__init__(self, *args, **kwargs)
        except OSError as err:  # hub download (offline, unknown repo) or a missing local file
            bound = base_params.bind_partial(self, *args, **kwargs).arguments
            if not isinstance(bound.get("teacher_model"), str):
                raise
            raise weights_error(bound["teacher_model"], bound.get("teacher_pretrained_path"), err) from err
        masking["mask_mode"] = masking["mask_mode"] or "attention"
        self._setup_masking(**masking)

    __init__.__signature__ = _signature_with_masking(base)
    namespace: Dict[str, Any] = {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                 "__doc__": _CLASS_DOCS[name].format(base=base_name)}
    # Only where the installed timm has them: the base class's own compile / task state hooks.
    if getattr(base, "compile", None) is not getattr(nn.Module, "compile", None):
        def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs: Any):
            return self._compile_masked(super(cls, self).compile, backend, mode, compile_kwargs)
        namespace["compile"] = compile
    if hasattr(base, "get_task_state"):
        def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
            state = dict(super(cls, self).get_task_state(module=module, ema=ema) or {})
            if not ema:  # masking belongs to training, not to the EMA weights
                state[TASK_STATE_KEY] = self._masked_task_state()
            return state

        def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                            module: Optional[nn.Module] = None, ema: bool = False) -> None:
            state = dict(state or {})
            ours = state.pop(TASK_STATE_KEY, None)
            if ours is not None and not ema:
                self._load_masked_task_state(ours)
            super(cls, self).load_task_state(state or None, strict=strict, module=module, ema=ema)
        namespace["get_task_state"] = get_task_state
        namespace["load_task_state"] = load_task_state
    cls = type(name, (_MaskedTaskMixin, base), namespace)
    return cls


_CLASS_DOCS = {
    "MaskedLogitDistillationTask": """timm's ``{base}`` whose teacher sees only the patches the student attends to.

    Constructor: exactly ``timm.task.{base}``'s arguments, plus
      keep_ratio: fraction of teacher patches kept (default 0.5 with a patch-token teacher, 1.0 with a CNN),
      num_keep: an absolute count instead (98 of 196 in the paper),
      mask_mode: 'attention' (default: the student's last-layer class-token attention), 'random',
        'teacher' (analysis only: an extra full teacher pass) or 'none'.
    ``task(input, target)`` returns timm's dict plus ``num_keep`` (teacher patches kept per image this step).
    """,
    "MaskedTokenDistillationTask": """timm's ``{base}`` (distillation-token students) with a masked teacher.

    Constructor: exactly ``timm.task.{base}``'s arguments plus keep_ratio / num_keep / mask_mode, as
    ``MaskedLogitDistillationTask``. The mask is read from the student's class-token attention.
    ``task(input, target)`` returns timm's dict (its ``distill_loss`` key included) plus ``num_keep``.
    """,
}

_BUILT: Dict[str, type] = {}


def task_class(name: str) -> type:
    """``MaskedLogitDistillationTask`` or ``MaskedTokenDistillationTask``, built on first use against the installed
    timm (raises ``TimmTaskUnavailable`` on a timm without ``timm.task``)."""
    if name not in TASK_BASES:
        raise KeyError(f"unknown task {name!r}: one of {sorted(TASK_BASES)}")
    if name not in _BUILT:
        _BUILT[name] = _build_task_class(name)
    return _BUILT[name]


def configured(name: str, **defaults: Any) -> type:
    """A subclass of ``task_class(name)`` whose constructor fills ``defaults`` for arguments the caller leaves out
    (``keep_ratio``, ``num_keep``, ``mask_mode``, or any timm argument such as ``teacher_pretrained_path``)."""
    base = task_class(name)
    log_cost = bool(defaults.pop("log_supervision_cost", False))
    return type(name, (base,), {"task_defaults": {**base.task_defaults, **defaults},
                                "log_supervision_cost": log_cost, "__module__": __name__, "__qualname__": name})


def __getattr__(attr: str) -> Any:
    # PEP 562: the classes exist only once asked for, so importing this module never needs timm.task.
    if attr in TASK_BASES:
        return task_class(attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["MaskedLogitDistillationTask", "MaskedTokenDistillationTask", "TeacherMasker", "TeacherWeightsUnavailable",
           "TimmTaskUnavailable", "configured", "task_class", "timm_task_base"]
