"""Section 5: the fast teacher path, ``teacher_dtype=bfloat16`` (+ ``compile_teacher=True``), against eager autocast.

Each variant runs the masked teacher through the loss's own call, ``loss(samples, outputs, labels)``, on fixed
student logits (mask_mode='random', so no student forward is involved; the loss arithmetic on the logits is
microseconds next to the teacher). Also a bf16 matmul ceiling and the fraction of it the teacher reaches.
"""
from __future__ import annotations

import copy
import gc
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import MaskedDistillationLoss

from ..context import BenchContext, release
from ..models import TokenCounter, short_name
from ..report import fmt, print_table
from ..timing import interleaved, paired_ratio, peak_extra_mib

KEY = "fast_teacher"


def matmul_ceiling(ctx: BenchContext) -> Dict[str, float]:
    """Best GEMM throughput in TFLOP/s (2*n^3 FLOP per n x n x n product), per dtype (measured once per run)."""
    if "matmul_ceiling" in ctx.cache:
        return ctx.cache["matmul_ceiling"]
    out = {}
    cuda = ctx.device.type == "cuda"
    cases = [(8192, torch.bfloat16)] if cuda else [(1024, torch.float32), (512, torch.bfloat16)]
    for n, dtype in cases:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(ctx.device, dtype)
        b = torch.randn(n, n, generator=gen).to(ctx.device, dtype)
        # On CPU F.linear (a @ b.T) and a @ b may take different kernels: keep the faster.
        fns: Dict[str, Callable[[], Any]] = {"matmul": lambda a=a, b=b: a @ b}
        if not cuda:
            fns["linear"] = lambda a=a, b=b: F.linear(a, b)
        iters = max(ctx.args.iters, 20) if cuda else max(3, ctx.args.iters // 4)
        stats = interleaved(fns, warmup=2, iters=iters, clock=ctx.clock)
        best = min(st.median for st in stats.values())
        out[str(dtype).replace("torch.", "")] = 2 * n ** 3 / (best / 1e3) / 1e12
        out[f"{str(dtype).replace('torch.', '')}_n"] = n
        del a, b, fns
    ctx.cache["matmul_ceiling"] = out
    return out


def fast_specs(ctx: BenchContext) -> List[str]:
    args = ctx.args
    if args.fast_teachers == "all":
        return list(args.teachers)
    if args.fast_teachers == "first":
        return args.teachers[:1]
    wanted = args.fast_teachers.split(",")
    return [s for s in args.teachers if short_name(s) in wanted or s in wanted] or args.teachers[:1]


def run(ctx: BenchContext, teachers: Optional[List[str]] = None) -> Dict[str, Any]:
    args, x, y = ctx.args, ctx.x, ctx.y
    keep = args.distill_keep
    ceilings = matmul_ceiling(ctx)
    cpu = ctx.device.type != "cuda"
    specs = teachers if teachers is not None else fast_specs(ctx)
    student = ctx.student()
    s_out = torch.randn(args.batch_size, args.num_classes, generator=torch.Generator().manual_seed(args.seed))
    s_out = s_out.to(ctx.device)
    rows, out = [], {"matmul_ceiling_tflops": ceilings, "teachers": [], "notes": []}
    for spec in specs:
        teacher = ctx.teacher(spec)
        name = short_name(spec)
        k = ctx.num_keep(teacher, keep)
        g_keep = ctx.gmac(teacher, (spec, k), kind="teacher")
        g_full = ctx.gmac(teacher, (spec, None), kind="teacher")
        common = dict(student=student, keep_ratio=keep, mask_mode="random")
        eager = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, **common)
        counter = TokenCounter(teacher)
        try:
            eager(x, s_out, y)
        finally:
            counter.remove()
        if counter.tokens != k + int(teacher.num_prefix_tokens):
            raise RuntimeError(f"{name}: the masked loss ran its teacher on {counter.tokens} tokens, the bench "
                               f"expected {k + int(teacher.num_prefix_tokens)} ({k} kept patches at keep {keep:g})")
        t_bf16 = copy.deepcopy(teacher)
        bf16 = MaskedDistillationLoss(nn.CrossEntropyLoss(), t_bf16, "soft", 0.5, 1.0,
                                      teacher_dtype=torch.bfloat16, **common)
        variants: Dict[str, Callable[[], Any]] = {}

        def full_autocast(teacher=teacher):
            with torch.no_grad(), torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16):
                return teacher(x)

        def eager_autocast(eager=eager):
            with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16):
                return eager(x, s_out, y)

        if not cpu:  # the full teacher's share of the GPU's matmul peak (pointless with CPU bf16 emulation)
            variants["full, eager autocast bf16"] = full_autocast
        else:
            variants["keep, eager fp32"] = lambda eager=eager: eager(x, s_out, y)
        variants["keep, eager autocast bf16"] = eager_autocast
        variants["keep, bf16 weights eager"] = lambda bf16=bf16: bf16(x, s_out, y)
        compile_info: Dict[str, Any] = {}
        check: Dict[str, Any] = {}
        if args.no_compile:
            compile_info["skipped"] = "--no-compile"
        else:
            comp = MaskedDistillationLoss(nn.CrossEntropyLoss(), t_bf16, "soft", 0.5, 1.0,
                                          teacher_dtype=torch.bfloat16, compile_teacher=True, **common)
            try:
                t0 = time.perf_counter()
                comp(x, s_out, y)
                if not cpu:
                    torch.cuda.synchronize()
                compile_info["first_call_s"] = time.perf_counter() - t0
                check = _check_against_fp32(eager, comp, x, seed=args.seed)
                variants["keep, bf16 + compile"] = lambda comp=comp: comp(x, s_out, y)
                if not cpu:
                    comp_ac = MaskedDistillationLoss(nn.CrossEntropyLoss(), t_bf16, "soft", 0.5, 1.0,
                                                     teacher_dtype=torch.bfloat16, compile_teacher=True, **common)

                    def compiled_in_autocast(comp_ac=comp_ac):
                        with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16):
                            return comp_ac(x, s_out, y)

                    t0 = time.perf_counter()
                    compiled_in_autocast()
                    torch.cuda.synchronize()
                    compile_info["first_call_in_autocast_s"] = time.perf_counter() - t0
                    variants["keep, bf16 + compile, inside autocast"] = compiled_in_autocast
            except Exception as exc:  # noqa: BLE001 - report, do not abort the whole run
                compile_info["skipped"] = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}"
                traceback.print_exc()
        # DeiT calls the criterion inside the step's autocast (fp16 by default): does a bf16 teacher survive it?
        inside_autocast = {}
        for amp_name, amp_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            try:
                with torch.autocast(device_type=ctx.device.type, dtype=amp_dtype):
                    bf16(x, s_out, y)
                inside_autocast[amp_name] = "ok"
            except Exception as exc:  # noqa: BLE001 - a finding to report, not a reason to stop
                inside_autocast[amp_name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        stats = ctx.time(variants, f"fast teacher {name}")
        peak = {n: peak_extra_mib(fn, ctx.device) for n, fn in variants.items()}
        base = stats["keep, eager autocast bf16"]
        entry = {"teacher": spec, "keep": keep, "num_keep": k, "gmac_keep": g_keep, "gmac_full": g_full,
                 "compile": compile_info, "check_vs_fp32_eager": check,
                 "bf16_teacher_inside_autocast": inside_autocast, "variants": {}}
        for vname, stat in stats.items():
            g = g_full if vname.startswith("full") else g_keep
            tflops = 2 * g * 1e9 * args.batch_size / (stat.median / 1e3) / 1e12
            ratio = paired_ratio(stat, base)
            # Compare with the GEMM ceiling of the dtype the variant multiplies in.
            ceiling_dtype = "float32" if "fp32" in vname else "bfloat16"
            frac = tflops / ceilings[ceiling_dtype]
            rows.append([name, vname, fmt(stat.median), fmt(ctx.throughput(stat.median), ".0f"),
                         fmt(ratio, ".3f"), fmt(tflops, ".3f"), f"{100 * frac:.1f}%",
                         fmt(tflops / 2, ".3f"), fmt(peak[vname], ".0f")])
            entry["variants"][vname] = {**stat.as_dict(), "images_per_s": ctx.throughput(stat.median),
                                        "ratio_vs_eager_autocast_paired": ratio, "tflops_2xmac": tflops,
                                        "fraction_of_matmul_ceiling": frac, "ceiling_dtype": ceiling_dtype,
                                        "tmacs": tflops / 2,
                                        "peak_extra_mib": peak[vname]}
        out["teachers"].append(entry)
        release(bf16)
        del t_bf16, bf16, variants
        gc.collect()
    print_table(f"5. Fast teacher path at keep {keep:g} (the loss's call, mask_mode='random')",
                ["teacher", "variant", "ms", "img/s", "vs eager ac", "TFLOP/s", "of mm peak", "TMAC/s",
                 "peak MiB"], rows)
    print("  matmul ceiling (2*n^3 FLOP per n^3 product): "
          + ", ".join(f"{k} n={ceilings[k + '_n']}: {v:.4g} TFLOP/s" for k, v in ceilings.items()
                      if not k.endswith("_n"))
          + "; 'of mm peak' divides by the ceiling of the variant's matmul dtype (fp32 variants: float32). "
            "TFLOP/s = 2 x fvcore MACs / time; TMAC/s = the fvcore unit (ANCHORS.md's 183 TFLOP/s for "
            "deit3_huge = 167 GMAC x 256 / 232.5 ms is in this unit, against a 2*n^3 matmul figure)")
    for e in out["teachers"]:
        c = e["compile"]
        if "skipped" in c:
            print(f"  {short_name(e['teacher'])}: compile skipped ({c['skipped']})")
        else:
            print(f"  {short_name(e['teacher'])}: first compiled call {c.get('first_call_s', 0):.1f} s"
                  + (f" (+{c['first_call_in_autocast_s']:.1f} s inside autocast)"
                     if "first_call_in_autocast_s" in c else "")
                  + f"; vs fp32 eager on the same indices: {e['check_vs_fp32_eager']}")
        print(f"  {short_name(e['teacher'])}: bf16 teacher (eager) called inside the caller's autocast: "
              + ", ".join(f"{k}: {v}" for k, v in e["bf16_teacher_inside_autocast"].items()))
    if cpu:
        note = (f"CPU: capability {torch.backends.cpu.get_cpu_capability()}; how fast bf16 runs here depends on "
                "the CPU's bf16 support (without AVX512-BF16/AMX it is emulated, slower than fp32), so these ratios "
                "say nothing about the GPU fast path; the section checks that it runs and compiles")
        out["notes"].append(note)
        print("  " + note)
    return out


def _check_against_fp32(eager: nn.Module, comp: nn.Module, x: torch.Tensor, *, seed: int) -> Dict[str, Any]:
    """Same random indices (same seed) through eager fp32 and the compiled bf16 path, where the loss exposes its
    teacher logits; feature-detected, so a loss without ``teacher_logits`` only loses this check."""
    if not (hasattr(eager, "teacher_logits") and hasattr(comp, "teacher_logits")):
        return {"skipped": "the loss exposes no teacher_logits to compare"}
    torch.manual_seed(seed)
    ref = eager.teacher_logits(x).float()
    idx_ref = getattr(eager, "last_keep_idx", None)
    torch.manual_seed(seed)
    got = comp.teacher_logits(x).float()
    idx_got = getattr(comp, "last_keep_idx", None)
    check: Dict[str, Any] = {}
    if idx_ref is not None and idx_got is not None:
        check["same_keep_idx"] = bool(torch.equal(idx_ref, idx_got))
    check["max_rel_err_vs_fp32"] = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    check["argmax_agreement"] = (got.argmax(1) == ref.argmax(1)).float().mean().item()
    return check
