"""Section 4: fvcore GMAC per image of each configuration (deit_patch.cost), with the times sections 1-3 measured:
images/s, achieved FLOP/s and peak memory.

FLOP convention: fvcore counts one multiply-add as one "FLOP" (so DeiT-B is 17.6 "GFLOPs"); the tables call that
unit GMAC. Achieved throughput is reported in real FLOP/s = 2 x MAC/s, the unit a matmul's 2*n^3 is in.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Dict, Optional

from deit_patch.cost import student_gflops, teacher_gflops

from ..context import BenchContext
from ..models import set_fused_attn, short_name
from ..report import fmt, print_table
from ..timing import maxrss_mib

KEY = "cost"


def run(ctx: BenchContext) -> Dict[str, Any]:
    args = ctx.args
    t0 = time.perf_counter()
    student = ctx.student()
    s_fwd = ctx.gmac(student, ("student", None), kind="student")
    s_paper = student_gflops(set_fused_attn(ctx.student(), False), img_size=ctx.img)
    s_train = 3 * s_fwd
    rows, out = [], {"student_fwd_gmac": s_fwd, "student_train_gmac": s_train,
                     "student_paper_fwd_gmac": s_paper, "teachers": []}

    def achieved(gmac_img: float, ms: Optional[float]) -> Optional[float]:
        return None if ms is None else 2 * gmac_img * 1e9 * args.batch_size / (ms / 1e3) / 1e12

    st = ctx.results.get("student_step", {})
    s_ms = st.get("plain", {}).get("median_ms")
    rows.append(["student", "train step (3x fwd)", fmt(s_fwd, ".3f"), fmt(s_train, ".3f"), fmt(s_ms),
                 fmt(None if s_ms is None else ctx.throughput(s_ms), ".0f"), fmt(achieved(s_train, s_ms), ".3f"),
                 fmt(st.get("plain", {}).get("peak_extra_mib"), ".0f")])
    tf = {e["teacher"]: e for e in ctx.results.get("teacher_forward", [])}
    ds = {e["teacher"]: e for e in ctx.results.get("distill_step", [])}
    for spec in args.teachers:
        teacher = ctx.teacher(spec)
        name = short_name(spec)
        full = ctx.gmac(teacher, (spec, None), kind="teacher")
        entry = {"teacher": spec, "full_gmac": full, "keeps": {}}
        t_entry = tf.get(spec)
        ms = t_entry["full"]["median_ms"] if t_entry else None
        rows.append([name, "teacher fwd, all patches", fmt(full, ".3f"), fmt(full, ".3f"), fmt(ms),
                     fmt(None if ms is None else ctx.throughput(ms), ".0f"), fmt(achieved(full, ms), ".3f"),
                     fmt(t_entry["full"]["peak_extra_mib"] if t_entry else None, ".0f")])
        for keep in args.keeps:
            k = ctx.num_keep(teacher, keep)
            g = ctx.gmac(teacher, (spec, k), kind="teacher")
            entry["keeps"][str(keep)] = {"num_keep": k, "gmac": g, "saving": 1 - g / full}
            kt = next((e for e in (t_entry or {}).get("keeps", []) if abs(e["keep"] - keep) < 1e-9), None)
            ms = kt["plugin"]["median_ms"] if kt else None
            rows.append([name, f"teacher fwd, keep {keep:g} ({k} patches)", fmt(g, ".3f"), fmt(g, ".3f"),
                         fmt(ms), fmt(None if ms is None else ctx.throughput(ms), ".0f"),
                         fmt(achieved(g, ms), ".3f"), fmt(kt["peak_extra_mib"] if kt else None, ".0f")])
        keep = args.distill_keep
        k = ctx.num_keep(teacher, keep)
        g_keep = ctx.gmac(teacher, (spec, k), kind="teacher")
        t_paper_gmac = teacher_gflops(set_fused_attn(copy.deepcopy(teacher), False), img_size=ctx.img, num_keep=k)
        configs = {"full": s_train + full, "masked": s_train + g_keep, "ceiling": s_train + g_keep,
                   "paper": 3 * s_paper + t_paper_gmac}
        entry["distill_gmac"] = configs
        d = ds.get(spec, {}).get("variants", {})
        for cfg, g in configs.items():
            v = d.get(cfg, {})
            ms = v.get("median_ms")
            rows.append([name, f"distill step: {cfg}" + ("" if cfg == "full" else f" @{keep:g}"), "",
                         fmt(g, ".3f"), fmt(ms), fmt(None if ms is None else ctx.throughput(ms), ".0f"),
                         fmt(achieved(g, ms), ".3f"), fmt(v.get("peak_extra_mib"), ".0f")])
        out["teachers"].append(entry)
    print_table("4. fvcore cost per image (GMAC = fvcore 'GFLOPs', one multiply-add each) with measured times",
                ["model", "configuration", "fwd GMAC", "total GMAC", "ms", "img/s", "TFLOP/s (2xMAC)",
                 "peak MiB"], rows)
    mem_note = ("peak MiB = torch.cuda.max_memory_allocated above what was resident before one call"
                if ctx.device.type == "cuda" else
                f"peak memory per configuration: n/a on CPU (process max RSS {maxrss_mib():.0f} MiB)")
    print(f"  train step counted as 3x forward; {mem_note}; fvcore took {time.perf_counter() - t0:.1f} s")
    out["process_max_rss_mib"] = maxrss_mib()
    return out
