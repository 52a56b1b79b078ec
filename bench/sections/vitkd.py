"""Section 6: a train step with logit KD against logit KD + ViTKD feature terms (heads in the optimizer), each with
the full teacher and at ``--distill-keep`` (first teacher), plus the heads' fvcore GMAC.

Reads the loss's feature heads (``feature_kd``, ``feature_param_groups``) and ``deit_patch.features.heads_gflops``.
"""
from __future__ import annotations

from typing import Any, Dict

import torch.nn as nn

from deit_patch.features import heads_gflops
from losses import MaskedDistillationLoss

from ..context import BenchContext, release
from ..models import short_name
from ..report import fmt, print_table
from ..timing import paired_ratio, peak_extra_mib

KEY = "vitkd_step"


def run(ctx: BenchContext) -> Dict[str, Any]:
    args, x, y = ctx.args, ctx.x, ctx.y
    keep, spec = args.distill_keep, args.teachers[0]
    teacher = ctx.teacher(spec)
    variants, crits, labels, heads = {}, {}, {}, {}
    try:
        for feature_kd in (None, "vitkd"):
            for k in (1.0, keep):
                student = ctx.student()
                name = f"{feature_kd or 'logit'}@{k:g}"
                crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student,
                                              keep_ratio=k, mask_mode="attention", feature_kd=feature_kd)
                opt = ctx.optimizer(student)
                for group in crit.feature_param_groups(0.05):  # what main_maskedkd.py does
                    opt.add_param_group(group)
                crits[name] = crit
                variants[name] = ctx.train_step(student, opt, lambda out, crit=crit: crit(x, out, y))
                labels[name] = (("logit KD + ViTKD" if feature_kd else "logit KD")
                                + (", full teacher" if k == 1.0 else f", MaskedKD keep {k:g}"))
                if feature_kd:
                    kept = ctx.num_keep(teacher, k) if k < 1.0 else None
                    heads[name] = heads_gflops(crit.feature_kd, num_kept=kept)
        stats = ctx.time(variants, f"vitkd {short_name(spec)}")
        peak = {n: peak_extra_mib(fn, ctx.device) for n, fn in variants.items()}
    finally:
        for crit in crits.values():
            release(crit)
    base = stats["logit@1"]
    rows, out = [], {"teacher": spec, "keep": keep, "variants": {}}
    for name, stat in stats.items():
        rows.append([labels[name], fmt(stat.median), fmt(ctx.throughput(stat.median), ".0f"),
                     fmt(paired_ratio(stat, base), ".3f"), fmt(heads.get(name), ".3f"), fmt(peak[name], ".0f")])
        out["variants"][name] = {**stat.as_dict(), "label": labels[name], "vs_logit_full": paired_ratio(stat, base),
                                 "heads_gmac_per_img": heads.get(name), "peak_extra_mib": peak[name]}
    km = f"{keep:g}"
    out["vitkd_overhead_full"] = paired_ratio(stats["vitkd@1"], stats["logit@1"])
    out["vitkd_overhead_masked"] = paired_ratio(stats[f"vitkd@{km}"], stats[f"logit@{km}"])
    out["masked_saving_logit"] = 1 - paired_ratio(stats[f"logit@{km}"], stats["logit@1"])
    out["masked_saving_vitkd"] = 1 - paired_ratio(stats[f"vitkd@{km}"], stats["vitkd@1"])
    out["student_gmac_fwd"] = ctx.gmac(ctx.student(), ("student", None), kind="student")
    print_table(f"6. Logit KD vs logit KD + ViTKD (student {short_name(args.student)}, teacher {short_name(spec)})",
                ["variant", "ms", "img/s", "vs logit full", "heads GMAC/img", "peak MiB"], rows, left=1)
    print(f"  ViTKD step overhead: x{out['vitkd_overhead_full']:.3f} with the full teacher, "
          f"x{out['vitkd_overhead_masked']:.3f} at keep {km}; MaskedKD saves "
          f"{100 * out['masked_saving_logit']:.1f}% of the logit-KD step and "
          f"{100 * out['masked_saving_vitkd']:.1f}% "
          f"of the ViTKD step (student forward {out['student_gmac_fwd']:.3f} GMAC/img)")
    return out
