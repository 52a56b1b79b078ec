"""Section 7: what torch.compile (``--compile-backend``, default inductor) does to the student train step, with and
without ``AttentionCapture``. The compiled student's scores are checked against the eager student's first.
"""
from __future__ import annotations

import time
from typing import Any, Dict

import torch
import torch.nn.functional as F

from deit_patch.capture import AttentionCapture

from ..context import BenchContext
from deit_patch.masking import topk_indices

from ..models import short_name
from ..report import fmt, print_table
from ..timing import paired_ratio, peak_extra_mib

KEY = "compiled_student_step"


def run(ctx: BenchContext) -> Dict[str, Any]:
    args, x, y, batch = ctx.args, ctx.x, ctx.y, ctx.args.batch_size
    if args.no_compile:
        print("  skipped (--no-compile)")
        return {"skipped": "--no-compile"}
    models = {name: ctx.student() for name in ("eager", "eager+capture", "compiled", "compiled+capture")}
    for name in ("compiled", "compiled+capture"):
        models[name] = torch.compile(models[name], backend=args.compile_backend)
    # Built before any compiled call, as a training script builds its loss before the first step.
    captures = {name: AttentionCapture(models[name]) for name in ("eager+capture", "compiled+capture")}
    variants, first_call_s = {}, {}
    try:
        # Same weights before any step: the compiled student must hand over the eager student's scores.
        with ctx.amp():
            for name in ("eager+capture", "compiled+capture"):
                t0 = time.perf_counter()
                models[name](x)
                if name.startswith("compiled"):
                    first_call_s[name] = time.perf_counter() - t0
        got, want = captures["compiled+capture"].take(batch), captures["eager+capture"].take(batch)
        err = (got - want).abs().max().item()
        if err > 1e-4 or not torch.equal(topk_indices(got, got.shape[1] // 2), topk_indices(want, want.shape[1] // 2)):
            raise RuntimeError(f"compiled student's scores differ from the eager student's (max abs {err:.3g})")
        for name, model in models.items():
            capture = captures.get(name)

            def loss_fn(out, capture=capture):
                if capture is not None:
                    capture.take(batch)  # what the loss does with the scores
                return F.cross_entropy(out, y)

            variants[name] = ctx.train_step(model, ctx.optimizer(model), loss_fn)
        for name in ("compiled", "compiled+capture"):  # the first backward compiles too: keep it out of timing
            t0 = time.perf_counter()
            variants[name]()
            first_call_s[name] = first_call_s.get(name, 0.0) + time.perf_counter() - t0
        stats = ctx.time(variants, f"compiled student {args.compile_backend}")
        peak = {n: peak_extra_mib(fn, ctx.device) for n, fn in variants.items()}
    finally:
        for capture in captures.values():
            capture.remove()
    base = stats["eager"]
    pairs = {"eager": "eager", "eager+capture": "eager", "compiled": "eager",
             "compiled+capture": "eager+capture"}
    rows, out = [], {"student": args.student, "backend": args.compile_backend, "max_abs_score_diff": err,
                     "first_call_s": first_call_s, "variants": {}}
    for name, stat in stats.items():
        vs_eager = paired_ratio(stat, base)
        vs_pair = paired_ratio(stat, stats[pairs[name]])
        rows.append([name, fmt(stat.median), fmt(ctx.throughput(stat.median), ".0f"), fmt(vs_eager, ".3f"),
                     f"{vs_pair:.3f} vs {pairs[name]}", fmt(first_call_s.get(name), ".1f"),
                     fmt(peak[name], ".0f")])
        out["variants"][name] = {**stat.as_dict(), "vs_eager_paired": vs_eager, "vs_pair_paired": vs_pair,
                                 "pair": pairs[name], "images_per_s": ctx.throughput(stat.median),
                                 "peak_extra_mib": peak[name]}
    out["capture_overhead_eager"] = paired_ratio(stats["eager+capture"], stats["eager"])
    out["capture_overhead_compiled"] = paired_ratio(stats["compiled+capture"], stats["compiled"])
    print_table(f"7. Student train step, eager vs torch.compile(backend={args.compile_backend!r}), "
                f"{short_name(args.student)}", ["variant", "ms", "img/s", "vs eager", "vs its pair",
                                                 "first call s", "peak MiB"], rows, left=1)
    print(f"  capture overhead: x{out['capture_overhead_eager']:.3f} eager, "
          f"x{out['capture_overhead_compiled']:.3f} compiled; compiled scores vs eager: max abs diff {err:.2g}, "
          "same top-k; 'first call s' = compile (forward, then the first step's backward)")
    return out
