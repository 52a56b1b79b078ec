"""Two versions of the plugin in one process: a git ref's against the working tree's, interleaved and paired, so a
refactor's speed is compared without the load drift between two runs.

  python -m bench.ab_plugin --ref 12569a0                   # CPU sizes: the plugin before MaskedTeacher
  python -m bench.ab_plugin --ref HEAD --mode smoke --iters 3 --call-reps 20 --json out.json

The ref's ``losses.py`` and ``deit_patch/`` are extracted with ``git archive`` into a temporary folder, imported
under their own names, then moved aside in ``sys.modules`` (as ``_ref_plugin.<name>``) and the working tree's
modules put back; each version keeps its own module globals. Limitation: an import the ref's code makes inside a
function resolves to the working tree's module (none on the paths timed here).

1. The KD step per teacher (section 3's student, teachers, batch and keep; each variant trains its own copy of one
   student): MaskedDistillationLoss (attention mode) of the ref and of the working tree (probe at its default, and
   off where the loss takes ``probe_every``), DistillationLoss (full teacher) of both, and the ceiling (student
   step + pruned teacher on fixed indices: no selection, no bookkeeping). Paired ratios, p25-p75.
2. The loss call alone on the smoke models (the student's forward untimed, each call started on a fresh time slice):
   host time per call, and the aten ops it dispatches (torch.profiler, top level; on a GPU each is a kernel launch or
   a copy).
"""
from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from deit_patch.teachers import find_family, pruned_forward
import losses

from .context import BenchContext, release
from .models import short_name
from .report import print_table
from .supervision import complete_args, print_header, run_meta, setup_device
from .timing import Stat, paired_ratios

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_PATHS = ("losses.py", "deit_patch")


def _is_plugin(name: str) -> bool:
    return name == "losses" or name == "deit_patch" or name.startswith("deit_patch.")


def import_ref_plugin(ref: str, folder: str) -> ModuleType:
    """The ``losses`` module of git ref ``ref`` (with its own ``deit_patch``), beside the working tree's."""
    try:
        archive = subprocess.run(["git", "-C", ROOT, "archive", ref, *PLUGIN_PATHS], check=True,
                                 capture_output=True).stdout
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"git archive {ref} failed: {err.stderr.decode().strip()}: pass a commit of this "
                         "repository that has losses.py and deit_patch/") from None
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    current = {n: sys.modules.pop(n) for n in list(sys.modules) if _is_plugin(n)}
    sys.path.insert(0, folder)
    try:
        ref_losses = importlib.import_module("losses")
    finally:
        sys.path.remove(folder)
        for name in [n for n in sys.modules if _is_plugin(n)]:
            sys.modules["_ref_plugin." + name] = sys.modules.pop(name)
        sys.modules.update(current)
    if ref_losses is losses or not ref_losses.__file__.startswith(folder):
        raise RuntimeError(f"the ref's losses.py was not imported from {folder}")
    return ref_losses


def _takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def _criteria(ref: ModuleType, teacher: nn.Module, student_fn: Callable[[], nn.Module], keep: float
              ) -> Dict[str, tuple]:
    """name -> (criterion, its student)."""
    out = {}
    specs = [("ref masked", ref, {}), ("masked", losses, {})]
    if _takes(losses.MaskedDistillationLoss, "probe_every"):
        specs.append(("masked, probe off", losses, {"probe_every": 0}))
    specs += [("ref full", ref, None), ("full", losses, None)]
    for name, module, extra in specs:
        student = student_fn()
        if extra is None:
            crit = module.DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student)
        else:
            crit = module.MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student,
                                                 keep_ratio=keep, mask_mode="attention", **extra)
        out[name] = (crit, student)
    return out


def _ratio(a: Stat, b: Stat) -> Dict[str, float]:
    r = paired_ratios(a, b)
    return {"median": r.median, "p25": r.quantile(0.25), "p75": r.quantile(0.75)}


PAIRS = [("masked", "ref masked"), ("masked, probe off", "ref masked"), ("full", "ref full"),
         ("ref masked", "ceiling"), ("masked", "ceiling")]


def time_steps(ctx: BenchContext, ref: ModuleType) -> List[Dict[str, Any]]:
    args, x, y = ctx.args, ctx.x, ctx.y
    out, rows = [], []
    for spec in args.teachers:
        teacher = ctx.teacher(spec)
        family = find_family(teacher)
        fixed = ctx.random_keep_idx(teacher, ctx.num_keep(teacher, args.distill_keep))
        crits = _criteria(ref, teacher, ctx.student, args.distill_keep)
        steps = {name: ctx.train_step(s, ctx.optimizer(s), lambda out, crit=crit: crit(x, out, y))
                 for name, (crit, s) in crits.items()}
        s_ceil = ctx.student()

        def ceiling_loss(out, teacher=teacher, family=family, fixed=fixed):
            with torch.no_grad():
                t_out = pruned_forward(teacher, x, fixed, family)
            return F.cross_entropy(out, y) * 0.5 + losses.soft_kd(out, t_out, tau=1.0, reduction="numel") * 0.5

        steps["ceiling"] = ctx.train_step(s_ceil, ctx.optimizer(s_ceil), ceiling_loss)
        try:
            stats = ctx.time(steps, f"A/B {short_name(spec)}")
        finally:
            for crit, _ in crits.values():
                release(crit)
        ratios = {f"{a} / {b}": _ratio(stats[a], stats[b]) for a, b in PAIRS if a in stats}
        for key, r in ratios.items():
            rows.append([short_name(spec), key, f"{r['median']:.4f}", f"{r['p25']:.4f}-{r['p75']:.4f}"])
        out.append({"teacher": spec, "variants": {n: s.as_dict() for n, s in stats.items()}, "ratios": ratios})
    print_table(f"KD step, plugin of the ref vs the working tree (keep {args.distill_keep:g})",
                ["teacher", "paired ratio", "median", "p25-p75"], rows)
    return out


def time_calls(ref: ModuleType, reps: int, seed: int) -> Dict[str, Any]:
    """Host time of the loss call alone and its aten ops, on the smoke models (the teacher's compute is small)."""
    ctx = BenchContext(complete_args(argparse.Namespace(
        mode="smoke", device="cpu", section="teacher", warmup=None, iters=1, keeps="0.5", distill_keep=0.5,
        teachers=None, student=None, fast_teachers=None, batch_size=None, img_size=None, num_classes=None, amp=None,
        threads=None, seed=seed)))
    x, y = ctx.x, ctx.y
    teacher = ctx.teacher(ctx.args.teachers[0])
    crits = _criteria(ref, teacher, ctx.student, 0.5)
    times: Dict[str, List[float]] = {n: [] for n in crits}
    names = list(crits)
    warmup = 10
    try:
        for rep in range(warmup + reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                crit, student = crits[name]
                out = student(x)
                if hasattr(os, "sched_yield"):
                    # Start each timed call on a fresh time slice: on a loaded machine a call that ends past its
                    # slice waits out other processes, and which calls do depends on their phase, not their cost.
                    os.sched_yield()
                t0 = time.perf_counter()
                loss = crit(x, out, y)
                elapsed = time.perf_counter() - t0
                loss.backward()
                if rep >= warmup:
                    times[name].append(elapsed * 1e6)
        ops = {}
        for name, (crit, student) in crits.items():
            out = student(x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                loss = crit(x, out, y)
            loss.backward()
            ops[name] = collections.Counter(
                e.name for e in prof.events()
                if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    finally:
        for crit, _ in crits.values():
            release(crit)
    result: Dict[str, Any] = {"teacher": ctx.args.teachers[0], "batch": ctx.args.batch_size, "reps": reps,
                              "us": {}, "aten_ops": {n: sum(c.values()) for n, c in ops.items()}}
    rows = []
    for name in names:
        t = sorted(times[name])
        result["us"][name] = {"min": t[0], "p10": t[len(t) // 10], "median": statistics.median(t)}
        rows.append([name, f"{t[0]:.0f}", f"{t[len(t) // 10]:.0f}", f"{statistics.median(t):.0f}",
                     result["aten_ops"][name]])
    for a, b in (("masked", "ref masked"), ("full", "ref full")):
        diff = sorted(x - y for x, y in zip(times[a], times[b]))
        result[f"us {a} - {b}"] = {"p25": diff[len(diff) // 4], "median": statistics.median(diff),
                                   "p75": diff[3 * len(diff) // 4]}
        result[f"ops {a} - {b}"] = dict(ops[a] - ops[b])
        result[f"ops {b} - {a}"] = dict(ops[b] - ops[a])
    print_table(f"Loss call alone, smoke models ({short_name(result['teacher'])}, batch {result['batch']}), host "
                f"microseconds over {reps} paired calls", ["loss", "min", "p10", "median", "aten ops"], rows, left=1)
    for a, b in (("masked", "ref masked"), ("full", "ref full")):
        d = result[f"us {a} - {b}"]
        print(f"  {a} - {b}: paired {d['median']:+.0f} us (p25 {d['p25']:+.0f}, p75 {d['p75']:+.0f}); ops added "
              f"{result[f'ops {a} - {b}']}, removed {result[f'ops {b} - {a}']}")
    return result


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ab_plugin", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="git commit (or branch) whose plugin is compared with the working tree")
    p.add_argument("--mode", choices=("cpu", "smoke", "gpu"), default=None, help="model sizes (bench's modes)")
    p.add_argument("--device", default=None)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--parts", default="steps,calls", help="comma list of steps (1.) and calls (2.)")
    p.add_argument("--call-reps", type=int, default=300, help="paired loss calls of part 2")
    p.add_argument("--teachers", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    opts = p.parse_args(argv)
    bench_args = complete_args(argparse.Namespace(
        mode=opts.mode, device=opts.device, section="distill", warmup=None, iters=opts.iters, keeps="0.5",
        distill_keep=0.5, teachers=opts.teachers, student=None, fast_teachers=None, batch_size=None, img_size=None,
        num_classes=None, amp=None, threads=None, seed=opts.seed))
    bench_args.ref, bench_args.call_reps, bench_args.json = opts.ref, opts.call_reps, opts.json
    bench_args.parts = [part.strip() for part in opts.parts.split(",") if part.strip()]
    unknown = sorted(set(bench_args.parts) - {"steps", "calls"})
    if unknown or not bench_args.parts:
        p.error(f"--parts {opts.parts!r}: choose from steps, calls")
    return bench_args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = setup_device(args)
    meta = run_meta(args, device)
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", args.ref], capture_output=True, text=True).stdout.strip()
    meta.update(ref=args.ref, ref_commit=sha, call_reps=args.call_reps, parts=args.parts)
    print_header(f"Plugin A/B: {args.ref} ({sha[:10]}) vs the working tree", meta, args)
    with tempfile.TemporaryDirectory(prefix="ref_plugin_") as folder:
        ref = import_ref_plugin(args.ref, folder)
        results: Dict[str, Any] = {}
        if "steps" in args.parts:
            results["steps"] = time_steps(BenchContext(args), ref)
        if "calls" in args.parts:
            results["calls"] = time_calls(ref, args.call_reps, args.seed)
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
