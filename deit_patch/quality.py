"""Is masking helping on this data? The masked teacher judged while it trains, and a guard that acts on it.

Three parts, all fed by ``MaskedTeacher`` and read once per epoch (``pop``), with no per-step host sync:
- ``TeacherQuality``: from the logits the step already has, at no extra teacher cost, the teacher's top-1 against
  the batch labels (soft mixup/cutmix targets: their dominant class) and the mean entropy of its prediction.
- ``FidelityProbe``: every ``every`` steps, on the first ``images`` images of the batch, the full teacher and the
  teacher on a random mask of the same size run as references. Logged: the chosen mask's and the random mask's
  agreement with the full teacher's top-1, their top-1 against the labels, and KL(full || masked). The default
  interval keeps the probe's extra teacher tokens under ``budget`` (1%) of the masked teacher's tokens.
- ``MaskGuard``: over a window of probes, the chosen mask is judged markedly worse than a random mask of the same
  size (agreement with the full teacher lower by ``margin``), or far from the full teacher (agreement below
  ``1 - full_margin``), each with ``z`` standard errors to spare. It then warns with the numbers and the fix;
  ``action='fallback'`` also switches the run's mask criterion (to ``fallback``, default 'random', same keep count
  and cost), and the switch is recorded.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .masking import random_indices

GUARD_ACTIONS = ("warn", "fallback", "off")
GUARD_FALLBACKS = ("random", "full")  # same keep count with random patches / every patch (no saving)


class MaskGuardWarning(UserWarning):
    """The chosen mask leaves the teacher markedly worse than a random mask of the same size (or than the full
    teacher) on the probed training images."""


def hard_labels(labels: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """Class indices for top-1: the labels themselves, or a soft target's dominant class (mixup/cutmix)."""
    if labels is None or labels.shape[0] != batch:
        return None
    if labels.dim() == 2:
        return labels.argmax(dim=1)
    if labels.dim() == 1 and not labels.is_floating_point():
        return labels
    return None  # BCE-style or other targets: no top-1 to score


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def _kl(full: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """KL(full || masked) per image, at temperature 1."""
    log_f, log_m = F.log_softmax(full.float(), dim=1), F.log_softmax(masked.float(), dim=1)
    return (log_f.exp() * (log_f - log_m)).sum(dim=1)


def _check_int(name: str, value, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return value


def _check_fraction(name: str, value, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not ((0.0 <= value if allow_zero else 0.0 < value) and value <= 1.0):
        raise ValueError(f"{name}={value!r} must be a finite number in {'[0' if allow_zero else '(0'}, 1]")
    return float(value)


class TeacherQuality:
    """On-device sums of the teacher's top-1 against the labels and its prediction entropy, since the last pop."""

    KEYS = ("images", "labelled", "correct", "entropy")

    def __init__(self):
        self.sums: Optional[torch.Tensor] = None

    def update(self, logits: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        logits = logits.detach()
        hard = hard_labels(labels, logits.shape[0])
        # Counts come from shapes; new_full fills on the device (a tensor made from a Python number would be a
        # blocking host-to-device copy on CUDA, a sync every step).
        images = logits.new_full((), float(logits.shape[0]), dtype=torch.float64)
        labelled = logits.new_full((), 0.0 if hard is None else float(hard.shape[0]), dtype=torch.float64)
        correct = ((logits.argmax(dim=1) == hard.to(logits.device)).sum().double() if hard is not None
                   else logits.new_zeros((), dtype=torch.float64))
        row = torch.stack([images, labelled, correct, _entropy(logits).sum().double()])
        self.sums = row if self.sums is None else self.sums + row

    def pop(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, float]:
        sums, self.sums = self.sums, None
        images, labelled, correct, entropy = reduce(sums).tolist() if sums is not None else (0.0,) * 4
        if not images:
            return {}
        out = {"teacher_entropy": entropy / images}
        if labelled:
            out["teacher_acc1"] = 100.0 * correct / labelled
        return out


@dataclass
class ProbeResult:
    """One probe's sums (device tensors): images, agreement with the full teacher, labelled top-1, KL."""
    row: torch.Tensor

    KEYS = ("images", "agree_mask", "agree_random", "agree_both", "kl_mask", "kl_random", "labelled",
            "correct_full", "correct_mask", "correct_random")


class FidelityProbe:
    """Every ``every`` steps, the full teacher and a random mask of the same size on a few images, as references.

    ``every=None`` picks the interval at the first masked step so that the probe's extra teacher tokens (a full
    pass and a random-mask pass on ``images`` images) stay under ``budget`` of the masked teacher's tokens.
    The random masks come from a generator of the probe's own, so probing never shifts the training's RNG stream.
    """

    def __init__(self, *, every: Optional[int] = None, images: int = 8, budget: float = 0.01, seed: int = 0):
        self.every = None if every is None else _check_int("probe_every", every, low=0)
        self.images = _check_int("probe_images", images, low=1)
        self.budget = _check_fraction("probe_budget", budget)
        self.seed = int(seed)
        self.steps = 0
        self.sums: Optional[torch.Tensor] = None
        self._generator: Optional[torch.Generator] = None

    @property
    def enabled(self) -> bool:
        return self.every != 0

    def interval(self, *, batch: int, patches: int, kept: int, prefix: int) -> int:
        """Steps between probes: the given ``every``, or the smallest that keeps the probe within budget."""
        if self.every is not None:
            return self.every
        probe_tokens = min(self.images, batch) * ((patches + prefix) + (kept + prefix))
        step_tokens = batch * (kept + prefix)
        self.every = max(1, math.ceil(probe_tokens / (self.budget * step_tokens)))
        return self.every

    def due(self, *, batch: int, patches: int, kept: int, prefix: int) -> bool:
        """Whether this step probes (counts the step)."""
        if not self.enabled:
            return False
        self.steps += 1
        return self.steps % self.interval(batch=batch, patches=patches, kept=kept, prefix=prefix) == 0

    def random_keep(self, batch: int, patches: int, kept: int, device: torch.device) -> torch.Tensor:
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return random_indices(batch, patches, kept, device=device, generator=self._generator)

    def record(self, *, full: torch.Tensor, random: torch.Tensor, chosen: torch.Tensor,
               labels: Optional[torch.Tensor]) -> ProbeResult:
        top_full = full.argmax(dim=1)
        hard = hard_labels(labels, full.shape[0])
        n = full.new_full((), float(full.shape[0]), dtype=torch.float64)  # a device fill, not a host copy
        labelled = n if hard is not None else n * 0

        def correct(logits: torch.Tensor) -> torch.Tensor:
            return (logits.argmax(dim=1) == hard.to(logits.device)).sum().double() if hard is not None else n * 0

        agree_mask, agree_random = chosen.argmax(dim=1) == top_full, random.argmax(dim=1) == top_full
        row = torch.stack([n, agree_mask.sum().double(), agree_random.sum().double(),
                           (agree_mask & agree_random).sum().double(),  # the paired term of the guard's variance
                           _kl(full, chosen).sum().double(), _kl(full, random).sum().double(), labelled,
                           correct(full), correct(chosen), correct(random)])
        self.sums = row if self.sums is None else self.sums + row
        return ProbeResult(row)

    def pop(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, float]:
        sums, self.sums = self.sums, None
        if sums is None:
            sums = torch.zeros(len(ProbeResult.KEYS), dtype=torch.float64)
        return summarise(reduce(sums).tolist())


def summarise(values: Sequence[float]) -> Dict[str, float]:
    """Probe sums -> the logged figures (agreement and top-1 in %, KL in nats per image)."""
    s = dict(zip(ProbeResult.KEYS, values))
    if not s["images"]:
        return {}
    n, labelled = s["images"], s["labelled"]
    out = {"probe_images": n, "probe_agree_mask": 100.0 * s["agree_mask"] / n,
           "probe_agree_random": 100.0 * s["agree_random"] / n,
           "probe_kl_mask": s["kl_mask"] / n, "probe_kl_random": s["kl_random"] / n}
    if labelled:
        out.update(probe_acc1_full=100.0 * s["correct_full"] / labelled,
                   probe_acc1_mask=100.0 * s["correct_mask"] / labelled,
                   probe_acc1_random=100.0 * s["correct_random"] / labelled)
    return out


@dataclass
class MaskGuard:
    """Judges the last ``window`` probes; ``check`` returns a verdict (with the numbers) when masking hurts.

    margin: the chosen mask agrees with the full teacher's top-1 this much less often than a random mask does
      (0.10: 10 points). full_margin: the chosen mask agrees with it on fewer than ``1 - full_margin`` of the images.
    Both are judged with ``z`` standard errors to spare, on the same probed images (a paired comparison): a clear
    case fires after ``min_images`` images, a borderline one needs the whole window, noise never should (with a true
    gap of zero, firing on 64 images takes a gap 5 standard errors wide).
    """
    action: str = "warn"
    fallback: str = "random"
    margin: float = 0.10
    full_margin: float = 0.5
    window: int = 8
    min_images: int = 16
    z: float = 3.0
    recent: List[torch.Tensor] = field(default_factory=list)
    fired: Optional[Dict[str, float]] = None    # the verdict that fired first (kept for the log and checkpoint)
    switched: Optional[Dict[str, object]] = None  # the fallback switch, when one happened
    fired_since_pop: bool = False

    def __post_init__(self):
        if self.action not in GUARD_ACTIONS:
            raise ValueError(f"mask_guard={self.action!r} is not one of {GUARD_ACTIONS}")
        if self.fallback not in GUARD_FALLBACKS:
            raise ValueError(f"guard_fallback={self.fallback!r} is not one of {GUARD_FALLBACKS}")
        _check_fraction("guard_margin", self.margin, allow_zero=True)
        _check_fraction("guard_full_margin", self.full_margin, allow_zero=True)
        _check_int("guard_window", self.window, low=1)
        _check_int("guard_min_images", self.min_images, low=1)
        if not math.isfinite(self.z) or self.z < 0:
            raise ValueError(f"guard_z={self.z!r} must be a finite number >= 0")

    @property
    def active(self) -> bool:
        return self.action != "off" and self.switched is None

    def check(self, result: ProbeResult, reduce: Callable[[torch.Tensor], torch.Tensor]
              ) -> Optional[Dict[str, float]]:
        """Add one probe; once the window is full, the verdict over it (one host sync per probe), else None."""
        self.recent = (self.recent + [result.row])[-self.window:]
        sums = dict(zip(ProbeResult.KEYS, reduce(torch.stack(self.recent).sum(dim=0)).tolist()))
        n = sums["images"]
        if n < self.min_images:
            return None
        mask, random = sums["agree_mask"] / n, sums["agree_random"] / n
        # Per image d = agree_random - agree_mask in {-1, 0, 1}: E[d^2] = P(random) + P(mask) - 2 P(both).
        gap = random - mask
        gap_se = math.sqrt(max(random + mask - 2 * sums["agree_both"] / n - gap * gap, 0.0) / n)
        mask_se = math.sqrt(mask * (1 - mask) / n)
        worse = self.margin > 0 and gap - self.z * gap_se >= self.margin
        far = self.full_margin > 0 and mask + self.z * mask_se < 1 - self.full_margin
        return summarise(list(sums.values())) if worse or far else None

    def message(self, window: Dict[str, float], *, mask_mode: str, kept: int, patches: int) -> str:
        acc = ""
        if "probe_acc1_mask" in window:
            acc = (f"; top-1 against the labels: chosen {window['probe_acc1_mask']:.1f}%, random "
                   f"{window['probe_acc1_random']:.1f}%, full teacher {window['probe_acc1_full']:.1f}%")
        what = (f"mask_mode={mask_mode!r} at {kept}/{patches} patches leaves the teacher markedly worse than a random "
                f"mask of the same size: over the last {int(window['probe_images'])} probed training images it "
                f"agrees with the full teacher's top-1 on {window['probe_agree_mask']:.1f}% (random mask: "
                f"{window['probe_agree_random']:.1f}%), KL(full || masked) {window['probe_kl_mask']:.3f} (random: "
                f"{window['probe_kl_random']:.3f}){acc}")
        if self.action == "fallback":
            return what + f". Switching this run to the fallback ({self.fallback!r}) as mask_guard='fallback' asks."
        return what + (". Distilling from it can leave the student worse than no KD: use mask_mode='mixed' (half "
                       "attention, half random; same cost) or 'random', or a higher keep ratio, or "
                       "mask_guard='fallback' to switch automatically (main_maskedkd.py: --mask-guard fallback)")

    def state(self) -> Dict[str, object]:
        return {"action": self.action, "fallback": self.fallback, "fired": self.fired, "switched": self.switched}

    def warn(self, message: str) -> None:
        warnings.warn(message, MaskGuardWarning, stacklevel=2)


def quality_summary(stats: Dict[str, float]) -> str:
    """One line on the teacher from an epoch's ``pop_stats`` figures ('' when the teacher did not run)."""
    if "teacher_patch_share" not in stats:
        return ""
    parts = [f"teacher saw {100 * stats['teacher_patch_share']:.0f}% of its patches "
             f"(+{stats.get('teacher_prefix_tokens', 0):g} prefix tokens/img)"]
    if "teacher_acc1" in stats:
        parts.append(f"top-1 {stats['teacher_acc1']:.1f}% on the training labels")
    if "teacher_entropy" in stats:
        parts.append(f"entropy {stats['teacher_entropy']:.3f}")
    if stats.get("probe_images"):
        probe = (f"probe ({int(stats['probe_images'])} img): agrees with the full teacher "
                 f"{stats['probe_agree_mask']:.1f}% "
                 f"(random mask {stats['probe_agree_random']:.1f}%), KL {stats['probe_kl_mask']:.3f} "
                 f"(random {stats['probe_kl_random']:.3f})")
        if "probe_acc1_mask" in stats:
            probe += (f", top-1 {stats['probe_acc1_mask']:.1f}% (random {stats['probe_acc1_random']:.1f}%, "
                      f"full {stats['probe_acc1_full']:.1f}%)")
        parts.append(probe)
    if stats.get("mask_guard_fired"):
        parts.append("MASK GUARD: the chosen mask is markedly worse than random (see the warning)")
    return "masked teacher: " + "; ".join(parts)
