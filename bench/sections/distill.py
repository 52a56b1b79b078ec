"""Section 3: the full distillation step at ``--distill-keep``.

Variants, all training the same initial student: DistillationLoss (full teacher); MaskedDistillationLoss
(attention mode); the ceiling (student step + pruned teacher on precomputed indices, no selection cost); and the
paper-code-style baseline (explicit attention in student and teacher, the class-token row read from the map).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from deit_patch.masking import resample_scores, topk_indices
from deit_patch.teachers import pruned_forward
from losses import DistillationLoss, MaskedDistillationLoss, soft_kd

from ..context import BenchContext, release
from ..models import MapHook, TokenCounter, patch_grid, reference_forward, set_fused_attn, short_name
from ..report import fmt, print_table
from ..timing import paired_ratio, peak_extra_mib
from .teacher import require_masking

KEY = "distill_step"
VARIANTS = ("full", "masked", "ceiling", "paper")


def run(ctx: BenchContext, teachers: Optional[List[str]] = None,
        variants: Sequence[str] = VARIANTS) -> List[Dict[str, Any]]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "masked" not in variants:
        raise ValueError(f"distill variants {list(variants)}: choose from {VARIANTS}, 'masked' among them")
    args, x, y = ctx.args, ctx.x, ctx.y
    keep, alpha, tau = args.distill_keep, 0.5, 1.0
    s_full, s_masked, s_ceil = ctx.student(), ctx.student(), ctx.student()
    s_paper = set_fused_attn(ctx.student(), False)
    opts = {id(m): ctx.optimizer(m) for m in (s_full, s_masked, s_ceil, s_paper)}
    maps = MapHook(s_paper.blocks[-1].attn)
    s_prefix = int(s_paper.num_prefix_tokens)
    s_grid = patch_grid(s_paper)
    rows, out = [], []
    try:
        for spec in teachers if teachers is not None else args.teachers:
            teacher = ctx.teacher(spec)
            family = require_masking(teacher, spec)
            t_grid = patch_grid(teacher)
            k = ctx.num_keep(teacher, keep)
            fixed_idx = ctx.random_keep_idx(teacher, k)
            t_paper = set_fused_attn(copy.deepcopy(teacher), False).eval() if "paper" in variants else None
            full_crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha, tau, student=s_full)
            masked_crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha, tau,
                                                 student=s_masked, keep_ratio=keep, mask_mode="attention")

            def ceiling_loss(out, teacher=teacher, family=family, fixed_idx=fixed_idx):
                with torch.no_grad():
                    t_out = pruned_forward(teacher, x, fixed_idx, family)
                return F.cross_entropy(out, y) * (1 - alpha) + soft_kd(out, t_out, tau=tau, reduction="numel") * alpha

            def paper_loss(out, t_paper=t_paper, t_grid=t_grid, k=k):
                with torch.no_grad():
                    scores = maps.cls_row(s_prefix)
                    scores = resample_scores(scores, src_grid=s_grid, dst_grid=t_grid)
                    idx = topk_indices(scores, k)
                    t_out = reference_forward(t_paper, x, idx)
                return F.cross_entropy(out, y) * (1 - alpha) + soft_kd(out, t_out, tau=tau, reduction="numel") * alpha

            steps = {
                "full": lambda: ctx.train_step(s_full, opts[id(s_full)],
                                               lambda out, crit=full_crit: crit(x, out, y)),
                "masked": lambda: ctx.train_step(s_masked, opts[id(s_masked)],
                                                 lambda out, crit=masked_crit: crit(x, out, y)),
                "ceiling": lambda: ctx.train_step(s_ceil, opts[id(s_ceil)], ceiling_loss),
                "paper": lambda: ctx.train_step(s_paper, opts[id(s_paper)], paper_loss),
            }
            timed = {name: steps[name]() for name in VARIANTS if name in variants}
            try:
                # The ceiling and the FLOP counts assume the loss keeps k patches: check what its teacher runs on.
                counter = TokenCounter(teacher)
                try:
                    timed["masked"]()
                finally:
                    counter.remove()
                want = k + int(teacher.num_prefix_tokens)
                if counter.tokens != want:
                    raise RuntimeError(f"{short_name(spec)}: the masked loss ran its teacher on {counter.tokens} "
                                       f"tokens, the bench expected {want} ({k} kept patches at keep {keep:g})")
                stats = ctx.time(timed, f"distill {short_name(spec)}")
                peak = {n: peak_extra_mib(fn, ctx.device) for n, fn in timed.items()}
            finally:
                release(masked_crit)
                del t_paper
            entry = _entry(ctx, spec, keep, k, stats, peak, rows)
            additive = _additive_ceiling(ctx, spec, keep)
            if additive is not None:
                entry["saving_ceiling_additive"] = additive
            out.append(entry)
    finally:
        maps.handle.remove()
    print_table(f"3. Distillation step (student {short_name(args.student)} fwd+bwd+AdamW + teacher)",
                ["teacher", "variant", "ms", "img/s", "vs full", "saved", "peak MiB"], rows)
    summary = []
    for e in out:
        summary.append([short_name(e["teacher"]), _pct(e.get("saving_ours")), _pct(e.get("saving_ceiling")),
                        fmt(e.get("gap_pp"), "+.1f"), _pct(e.get("saving_ceiling_additive")),
                        fmt(e.get("speedup_ours_vs_paper"), ".3f")])
    print_table(f"   summary at keep {keep:g}",
                ["teacher", "ours saved", "ceiling saved", "gap pp", "additive ceil", "ours vs paper x"],
                summary, left=1)
    print("  saved = 1 - step/full-step (paired median); gap pp = ceiling - ours; additive ceil = ANCHORS.md's "
          "(student step + teacher@keep) / (student step + full teacher) from sections 1-2 when run; "
          "ours vs paper x = paper-style step time / ours")
    return out


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _entry(ctx: BenchContext, spec: str, keep: float, k: int, stats, peak, rows: list) -> Dict[str, Any]:
    full = stats.get("full")
    full_ms = full.median if full is not None else None
    saving = {n: 1 - paired_ratio(stats[n], full) for n in stats} if full is not None else {}
    labels = {"full": "DistillationLoss, full teacher",
              "masked": f"MaskedDistillationLoss keep {keep:g} (attention)",
              "ceiling": "ceiling: student step + pruned teacher, fixed idx",
              "paper": "paper-code style (explicit attn, map hook)"}
    entry: Dict[str, Any] = {"teacher": spec, "keep": keep, "num_keep": k, "variants": {}}
    if "masked" in saving and "ceiling" in saving:
        entry.update(saving_ours=saving["masked"], saving_ceiling=saving["ceiling"],
                     gap_pp=100 * (saving["ceiling"] - saving["masked"]))
    if "paper" in stats:
        entry["speedup_ours_vs_paper"] = paired_ratio(stats["paper"], stats["masked"])
    for name, stat in stats.items():
        rows.append([short_name(spec), labels[name], fmt(stat.median), fmt(ctx.throughput(stat.median), ".0f"),
                     fmt(None if full_ms is None else stat.median / full_ms, ".3f"),
                     _pct(saving.get(name)), fmt(peak[name], ".0f")])
        entry["variants"][name] = {**stat.as_dict(), "images_per_s": ctx.throughput(stat.median),
                                   "saving_vs_full_paired": saving.get(name), "peak_extra_mib": peak[name]}
    return entry


def _additive_ceiling(ctx: BenchContext, spec: str, keep: float) -> Optional[float]:
    student = ctx.results.get("student_step", {}).get("plain")
    for entry in ctx.results.get("teacher_forward", []):
        if entry["teacher"] != spec or student is None:
            continue
        for k in entry["keeps"]:
            if abs(k["keep"] - keep) < 1e-9:
                s = student["median_ms"]
                return 1 - (s + k["plugin"]["median_ms"]) / (s + entry["full"]["median_ms"])
    return None
