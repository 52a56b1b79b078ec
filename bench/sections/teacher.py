"""Section 1: teacher forward (no grad, eval), the plugin's ``pruned_forward`` against a hand-written timm gather.

At each keep ratio, plus the unmodified ``teacher(x)``. The two forwards must agree before their times count.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch

from deit_patch.teachers import find_family, pruned_forward

from ..context import BenchContext
from ..models import patch_grid, reference_forward, short_name
from ..report import fmt, print_table
from ..timing import paired_ratio, peak_extra_mib

KEY = "teacher_forward"


def require_masking(teacher: torch.nn.Module, spec: str):
    """The plugin's family for this teacher, or a clear error where the plugin does not mask it."""
    family = find_family(teacher)
    if family is None:
        raise RuntimeError(f"the plugin does not mask {short_name(spec)} ({type(teacher).__name__}): "
                           "deit_patch.teachers.find_family finds no family for it")
    return family


def run(ctx: BenchContext, teachers: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    rows, out = [], []
    for spec in teachers if teachers is not None else ctx.args.teachers:
        teacher = ctx.teacher(spec)
        family = require_masking(teacher, spec)
        grid = patch_grid(teacher)
        patches = grid[0] * grid[1]
        x = ctx.x
        variants: Dict[str, Callable[[], Any]] = {}

        def full(teacher=teacher):
            with torch.no_grad(), ctx.amp():
                return teacher(x)

        variants["full"] = full
        keeps = {}
        for keep in ctx.args.keeps:
            k = ctx.num_keep(teacher, keep)
            idx = ctx.random_keep_idx(teacher, k)
            keeps[keep] = (k, idx)

            def plugin(teacher=teacher, idx=idx):
                with torch.no_grad(), ctx.amp():
                    return pruned_forward(teacher, x, idx, family)

            def reference(teacher=teacher, idx=idx):
                with torch.no_grad(), ctx.amp():
                    return reference_forward(teacher, x, idx)

            variants[f"plugin@{keep}"] = plugin
            variants[f"ref@{keep}"] = reference
            # The two must compute the same thing before their times mean anything.
            a, b = plugin().float(), reference().float()
            err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
            if err > ctx.teacher_tol():
                raise RuntimeError(f"{short_name(spec)} keep {keep}: plugin and reference logits differ "
                                   f"(max rel err {err:.3g})")
            if k == patches:
                err_full = (a - full().float()).abs().max().item() / max(a.abs().max().item(), 1e-6)
                if err_full > ctx.teacher_tol():
                    raise RuntimeError(f"{short_name(spec)}: keeping every patch differs from teacher(x) "
                                       f"(max rel err {err_full:.3g})")
        stats = ctx.time(variants, f"teacher {short_name(spec)}")
        peak = {n: peak_extra_mib(fn, ctx.device) for n, fn in variants.items()}
        full_ms = stats["full"].median
        rows.append([short_name(spec), "teacher(x)", f"{patches}/{patches}", fmt(full_ms), "", "",
                     fmt(ctx.throughput(full_ms), ".0f"), "1.000", fmt(peak["full"], ".0f")])
        entry = {"teacher": spec, "grid": list(grid), "num_patches": patches,
                 "family": getattr(family, "name", type(family).__name__),
                 "full": {**stats["full"].as_dict(), "images_per_s": ctx.throughput(full_ms),
                          "peak_extra_mib": peak["full"]}, "keeps": []}
        for keep, (k, _) in keeps.items():
            p, r = stats[f"plugin@{keep}"], stats[f"ref@{keep}"]
            ratio = paired_ratio(p, r)
            rows.append([short_name(spec), f"{keep:g}", f"{k}/{patches}", fmt(p.median), fmt(r.median),
                         fmt(ratio, ".3f"), fmt(ctx.throughput(p.median), ".0f"),
                         fmt(p.median / full_ms, ".3f"), fmt(peak[f"plugin@{keep}"], ".0f")])
            entry["keeps"].append({"keep": keep, "num_keep": k, "plugin": p.as_dict(), "reference": r.as_dict(),
                                   "ratio_plugin_over_reference_paired": ratio,
                                   "ratio_plugin_over_reference_medians": p.median / r.median,
                                   "plugin_over_full": p.median / full_ms,
                                   "images_per_s": ctx.throughput(p.median),
                                   "peak_extra_mib": peak[f"plugin@{keep}"],
                                   "peak_extra_mib_reference": peak[f"ref@{keep}"]})
        out.append(entry)
    print_table("1. Teacher forward (no grad, eval): plugin pruned_forward vs hand-written timm gather",
                ["teacher", "keep", "patches", "plugin ms", "ref ms", "plugin/ref", "img/s", "vs full",
                 "peak MiB"], rows)
    print("  plugin/ref = median over repetitions of the paired ratio (ratio of medians in the JSON); "
          "vs full = plugin / unmodified teacher(x); img/s of the plugin")
    return out
