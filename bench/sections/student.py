"""Section 2: student train step (forward + backward + AdamW) with and without the plugin's ``AttentionCapture``.

Also a paper-code-style student: explicit softmax attention in every block, the last map materialised by a hook.
"""
from __future__ import annotations

from typing import Any, Dict

import torch.nn.functional as F

from deit_patch.capture import AttentionCapture

from ..context import BenchContext
from ..models import MapHook, set_fused_attn, short_name
from ..report import fmt, print_table
from ..timing import paired_ratio, peak_extra_mib

KEY = "student_step"


def run(ctx: BenchContext) -> Dict[str, Any]:
    y, batch = ctx.y, ctx.args.batch_size
    plain, hooked, paper = ctx.student(), ctx.student(), set_fused_attn(ctx.student(), False)
    capture = AttentionCapture(hooked)
    maps = MapHook(paper.blocks[-1].attn)
    prefix = int(paper.num_prefix_tokens)

    def ce(out):
        return F.cross_entropy(out, y)

    def ce_take(out):
        capture.take(batch)  # what the loss does with the scores
        return F.cross_entropy(out, y)

    def ce_map(out):
        maps.cls_row(prefix)
        return F.cross_entropy(out, y)

    variants = {"plain": ctx.train_step(plain, ctx.optimizer(plain), ce),
                "capture": ctx.train_step(hooked, ctx.optimizer(hooked), ce_take),
                "paper": ctx.train_step(paper, ctx.optimizer(paper), ce_map)}
    try:
        stats = ctx.time(variants, "student step")
        peak = {n: peak_extra_mib(fn, ctx.device) for n, fn in variants.items()}
    finally:
        capture.remove()
        maps.handle.remove()
    base = stats["plain"]
    labels = {"plain": "timm default (fused SDPA), no hook",
              "capture": "with AttentionCapture (plugin)",
              "paper": "explicit softmax attention everywhere + last map hooked"}
    rows, out = [], {}
    for name, stat in stats.items():
        ratio = paired_ratio(stat, base)
        rows.append([labels[name], fmt(stat.median), fmt(stat.quantile(0.25)), fmt(stat.quantile(0.75)),
                     fmt(ctx.throughput(stat.median), ".0f"), fmt(ratio, ".3f"), fmt(peak[name], ".0f")])
        out[name] = {**stat.as_dict(), "ratio_vs_plain_paired": ratio,
                     "images_per_s": ctx.throughput(stat.median), "peak_extra_mib": peak[name]}
    print_table(f"2. Student train step (fwd+bwd+AdamW), {short_name(ctx.args.student)}",
                ["variant", "ms", "p25", "p75", "img/s", "vs plain", "peak MiB"], rows, left=1)
    return {"student": ctx.args.student, **out}
