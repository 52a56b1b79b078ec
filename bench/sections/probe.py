"""Section 8: what the fidelity probe costs the KD step (``MaskedTeacher``'s probe, deit_patch/quality.py).

Three ``MaskedDistillationLoss`` steps, each training its own copy of one student, on section 3's student, teachers,
batch and keep (``--distill-keep``, attention mode): the probe off (``probe_every=0``), at its default interval
(``probe_every=None``) and probing at every step (``probe_every=1``).

At the default interval the probe runs once every N steps, N chosen by the plugin at the first masked step as the
smallest that keeps the probe's extra teacher tokens within 1% of the masked teacher's (N ~ 10 at batch 256 on a
GPU, ~300 at the CPU sizes). Twenty repetitions then hold a few probing steps or none, and a median skips them, so
the step's cost at the default interval is put together from two paired ratios against the step without the probe:
  between   = steps of the default-interval loss that did not probe / off   (the per-step bookkeeping)
  probing   = a step that probes (probe_every=1) / off                       (the full teacher and a random mask on
                                                                              ``probe_images`` images, the guard)
  amortised = ((N - 1) * between + probing) / N                             target: <= 1.02
Spread: the same formula at the p25 and at the p75 of the two sets of paired ratios. ``between`` runs the same code
as the probe off but for a step counter, so on a busy machine its distance from 1 is the measurement's noise; the
probe's own part, (probing - between) / N, is reported beside it.

The token share is counted by the plugin's own meter (``meter.probe_tokens / meter.tokens``) over N consecutive
calls of the default-interval loss's masked teacher, given patch scores (so the student step is not repeated N
times); exactly one of those calls probes. On CUDA each variant's step is also run once under
``torch.cuda.set_sync_debug_mode``: the host syncs it makes.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from deit_patch.cost import TokenMeter
from deit_patch.masked_teacher import MaskedTeacher
from deit_patch.quality import MaskGuardWarning
from losses import MaskedDistillationLoss

from ..context import BenchContext, release
from ..models import short_name
from ..report import fmt, print_table
from ..timing import Stat, host_syncs, paired_ratios, peak_extra_mib
from .teacher import require_masking

KEY = "probe_step"
TARGET = 1.02  # the KD step with the probe at its default interval / without it
VARIANTS: Dict[str, Optional[int]] = {"off": 0, "default": None, "every": 1}  # name -> probe_every
LABELS = {"off": "probe off (probe_every=0)", "default": "probe at its default interval (probe_every=None)",
          "every": "probe at every step (probe_every=1)"}


def run(ctx: BenchContext, teachers: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args, x, y = ctx.args, ctx.x, ctx.y
    rows, out = [], []
    for spec in teachers if teachers is not None else args.teachers:
        teacher = ctx.teacher(spec)
        require_masking(teacher, spec)
        crits: Dict[str, MaskedDistillationLoss] = {}
        steps: Dict[str, Callable[[], None]] = {}
        try:
            for name, every in VARIANTS.items():
                student = ctx.student()
                crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student,
                                              keep_ratio=args.distill_keep, mask_mode="attention", probe_every=every)
                crits[name] = crit
                steps[name] = ctx.train_step(student, ctx.optimizer(student), lambda out, crit=crit: crit(x, out, y))
            probed: List[bool] = []  # per call of the default-interval step: did it probe?
            steps["default"] = _flagging(steps["default"], crits["default"].masked_teacher.meter, probed)
            with warnings.catch_warnings():
                # Random weights: the mask guard's verdict on them means nothing, only its cost counts here.
                warnings.simplefilter("ignore", MaskGuardWarning)
                stats = ctx.time(steps, f"probe {short_name(spec)}")
                timed_probed = probed[len(probed) - len(stats["default"].samples):]
                peak = {n: peak_extra_mib(fn, ctx.device) for n, fn in steps.items()}
                syncs = {n: host_syncs(fn, ctx.device) for n, fn in steps.items()}
                syncs_probed = probed[-1]  # whether the default-interval step whose syncs were counted probed
                count = count_window(ctx, crits["default"].masked_teacher)
        finally:
            for crit in crits.values():
                release(crit)
        masked = crits["default"].masked_teacher
        entry = _entry(spec, masked, stats, timed_probed, count, peak, syncs)
        entry.update(keep=args.distill_keep, host_syncs_default_step_probed=syncs_probed)
        for name, stat in stats.items():
            rows.append([short_name(spec), LABELS[name], fmt(stat.median),
                         fmt(ctx.throughput(stat.median), ".0f"), fmt(entry["variants"][name]["vs_off_paired"], ".3f"),
                         fmt(peak[name], ".0f"), fmt(syncs[name], "d")])
        out.append(entry)
    print_table(f"8. Fidelity probe on the KD step (student {short_name(args.student)} + MaskedDistillationLoss "
                f"keep {args.distill_keep:g})", ["teacher", "variant", "ms", "img/s", "vs off", "peak MiB",
                                                   "host syncs"], rows)
    summary = [[short_name(e["teacher"]), e["probe_every"], f"{100 * e['count']['share']:.2f}%",
                _spread(e["ratio_between"]), _spread(e["ratio_probing"]),
                f"{100 * e['probe_part_amortised']:+.2f}%",
                f"{e['overhead_amortised']:.4f} ({e['overhead_amortised_p25']:.4f}-{e['overhead_amortised_p75']:.4f})",
                "yes" if e["target_met"] else "NO"] for e in out]
    print_table("   summary: the step with the probe at its default interval / without it",
                ["teacher", "every N", "probe tokens", "between", "probing step", "probe part", "amortised (p25-p75)",
                 f"<= {TARGET}"], summary, left=1)
    print("  between / probing step: paired medians (p25-p75) vs the probe off; amortised = ((N-1) between + probing)"
          " / N; probe part = (probing - between) / N, the probe's own share of it (between runs the same code as\n"
          "  the probe off but a step counter: its distance from 1 is the measurement's noise); probe tokens = "
          "meter.probe_tokens / meter.tokens over N consecutive teacher calls")
    return out


def _flagging(step: Callable[[], None], meter: TokenMeter, flags: List[bool]) -> Callable[[], None]:
    def flagged() -> None:
        before = meter.probe_tokens
        step()
        flags.append(meter.probe_tokens != before)
    return flagged


def count_window(ctx: BenchContext, masked: MaskedTeacher) -> Dict[str, Any]:
    """The meter's teacher and probe tokens over one probe interval of consecutive teacher calls."""
    every = masked.probe.every
    if not every:
        raise RuntimeError("the default-interval probe has no interval after the timed steps: it never ran")
    gen = torch.Generator().manual_seed(ctx.args.seed)
    scores = torch.rand(ctx.args.batch_size, masked.num_patches, generator=gen).to(ctx.device)
    meter = masked.meter
    tokens, probe_tokens, probes = meter.tokens, meter.probe_tokens, 0
    with torch.no_grad(), ctx.amp():
        for _ in range(every):
            before = meter.probe_tokens
            masked(ctx.x, scores, labels=ctx.y)
            probes += meter.probe_tokens != before
    tokens, probe_tokens = meter.tokens - tokens, meter.probe_tokens - probe_tokens
    return {"calls": every, "tokens": tokens, "probe_tokens": probe_tokens, "probes": probes,
            "share": probe_tokens / tokens}


def _ratio(stat: Stat) -> Optional[Dict[str, float]]:
    if not stat.samples:
        return None
    return {"median": stat.median, "p25": stat.quantile(0.25), "p75": stat.quantile(0.75), "n": len(stat.samples)}


def _spread(ratio: Optional[Dict[str, float]]) -> str:
    return "n/a" if ratio is None else f"{ratio['median']:.3f} ({ratio['p25']:.3f}-{ratio['p75']:.3f})"


def _entry(spec: str, masked: MaskedTeacher, stats: Dict[str, Stat], timed_probed: List[bool],
           count: Dict[str, Any], peak: Dict[str, Any], syncs: Dict[str, Any]) -> Dict[str, Any]:
    off = stats["off"]
    every = masked.probe.every
    between = _ratio(paired_ratios(stats["default"], off, keep=[not p for p in timed_probed]))
    probing = _ratio(paired_ratios(stats["every"], off))
    amortised = {}
    for q in ("median", "p25", "p75"):
        # N == 1 (every step probes) leaves no step between probes: the probing step is the whole cost.
        rest = between[q] if between is not None else probing[q]
        amortised[q] = ((every - 1) * rest + probing[q]) / every
    rest_median = between["median"] if between is not None else 1.0
    entry: Dict[str, Any] = {
        "teacher": spec, "num_keep": masked.num_keep, "num_patches": masked.num_patches, "prefix": masked.prefix,
        "probe_images": masked.probe.images, "probe_budget": masked.probe.budget, "probe_every": every,
        "probing_reps": {"default": sum(timed_probed), "every": len(stats["every"].samples)},
        "ratio_between": between, "ratio_probing": probing,
        "ratio_default_as_timed": _ratio(paired_ratios(stats["default"], off)),
        "overhead_amortised": amortised["median"], "overhead_amortised_p25": amortised["p25"],
        "overhead_amortised_p75": amortised["p75"],
        # The probe's own part of the amortised ratio; ``between`` is the rest (the same code as the probe off but
        # a step counter, so its distance from 1 is mostly the noise of the measurement).
        "probe_part_amortised": (probing["median"] - rest_median) / every,
        "probe_extra_ms": (probing["median"] - rest_median) * off.median,
        "count": count, "target": TARGET, "target_met": amortised["median"] <= TARGET, "variants": {}}
    for name, stat in stats.items():
        entry["variants"][name] = {**stat.as_dict(), "probe_every": VARIANTS[name],
                                   "vs_off_paired": _ratio(paired_ratios(stat, off))["median"],
                                   "peak_extra_mib": peak[name], "host_syncs_per_step": syncs[name]}
    return entry
