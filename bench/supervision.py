"""What supervision costs, measured: the plugin's pruned teacher against plain timm code, in one process.

Sections (``--section``, comma separated, names or numbers; default all):
  1 teacher  teacher forward (no grad, eval): plugin ``pruned_forward`` vs a hand-written timm gather forward
             (patch_embed -> _pos_embed -> torch.gather -> blocks -> norm -> forward_head) at each keep, plus the
             unmodified ``teacher(x)``
  2 student  student train step (forward + backward + AdamW) with and without ``AttentionCapture`` (and a
             paper-code-style student: explicit softmax attention everywhere, last map materialised by a hook)
  3 distill  full distillation step: DistillationLoss (full teacher) vs MaskedDistillationLoss (attention mode),
             the ceiling (student step + pruned teacher on precomputed indices, no selection cost), and the
             paper-code-style baseline (explicit attention in student and teacher, cls row read from the map)
  4 cost     fvcore GFLOPs per configuration (cost.py), with the times above: images/s, achieved FLOP/s, peak memory
  5 fast     teacher_dtype=bfloat16 (+ compile_teacher=True) vs eager autocast, a bf16 matmul ceiling, and the
             fraction of it the teacher reaches
  6 vitkd    train step with logit KD vs logit KD + ViTKD feature terms (heads in the optimizer), each with the full
             teacher and at --distill-keep (first teacher), plus the heads' fvcore GMAC
  7 compiled student train step eager vs torch.compile (--compile-backend, default inductor), each with and without
             ``AttentionCapture``; the compiled scores are checked against the eager ones first
  8 probe    the KD step (MaskedDistillationLoss, --distill-keep) with the fidelity probe off, at its default
             interval and at every step: the step's cost at the default interval (paired ratios, amortised over the
             interval; target <= 1.02) and the probe's share of the teacher tokens as the plugin's meter counts it

Every ratio compares variants timed in the same process, interleaved round-robin inside each repetition (the
starting variant rotates), so drifting load hits them alike; the figures are medians over ``--iters`` repetitions
after ``--warmup``. GPU: CUDA events around each call after a synchronize. CPU: time.perf_counter.

FLOP convention: fvcore counts one multiply-add as one "FLOP" (so DeiT-B is 17.6 "GFLOPs"); the tables call
that unit GMAC. Achieved throughput is reported in real FLOP/s = 2 x MAC/s, the unit a matmul's 2*n^3 is in.

Run from the repository root:
  python -m bench                                  # CPU mode when no CUDA: small models, ~minutes
  python -m bench --mode gpu --json out.json
  python -m bench --section teacher,fast --iters 30
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

import timm
import torch

from .context import MODES, TIMING_ITERS_TO_REPORT, BenchContext
from .models import short_name
from .report import device_name
from .sections import SECTIONS

SECTION_NAMES = tuple(SECTIONS)


def parse_args(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog or "python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=tuple(MODES), default=None,
                   help="model sizes: 'gpu' real (batch 256, 224 px, bf16), 'cpu' small, 'smoke' toy (a code-path "
                        "check); default from the device")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--section", default="all",
                   help=f"comma list of {','.join(SECTION_NAMES)} or 1-{len(SECTION_NAMES)}, or 'all'")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=TIMING_ITERS_TO_REPORT,
                   help="timed repetitions (medians; use >= 20 for reported figures)")
    p.add_argument("--keeps", default="1.0,0.75,0.5,0.25")
    p.add_argument("--distill-keep", type=float, default=0.5, help="keep ratio for sections 3, 5, 6 and 8")
    p.add_argument("--teachers", default=None,
                   help="comma list of timm names, each optionally name:key=value:... (create_model overrides)")
    p.add_argument("--student", default=None)
    p.add_argument("--fast-teachers", default=None,
                   help="section 5 teachers: 'all', 'first' or names (default: all on gpu, first on cpu)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None,
                   help="autocast for sections 1-3 (default bf16 on gpu, none on cpu)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile in sections 5 and 7")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of section 7")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: 1 in cpu mode, see MODES; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every figure (with raw samples) here")
    args = p.parse_args(argv)
    return complete_args(args)


def complete_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what was left out from the mode's defaults; parse the lists; resolve the sections."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mode is None:
        args.mode = "gpu" if args.device.startswith("cuda") else "cpu"
    defaults = MODES[args.mode]
    for key in ("batch_size", "img_size", "num_classes", "warmup", "amp", "student", "teachers", "fast_teachers",
                "threads"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
    args.keeps = [float(k) for k in args.keeps.split(",")]
    if args.section == "all":
        args.sections = list(SECTION_NAMES)
    else:
        wanted = []
        for part in args.section.split(","):
            part = part.strip()
            name = SECTION_NAMES[int(part) - 1] if part.isdigit() and 1 <= int(part) <= len(SECTION_NAMES) else part
            if name not in SECTION_NAMES:
                raise SystemExit(f"unknown section {part!r}: choose from {SECTION_NAMES} or 1-{len(SECTION_NAMES)}")
            wanted.append(name)
        args.sections = [s for s in SECTION_NAMES if s in wanted]  # the cost table reads the timings before it
    return args


def setup_device(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def run_meta(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device), "mode": args.mode, "torch": torch.__version__, "timm": timm.__version__,
        "python": platform.python_version(), "batch_size": args.batch_size, "img_size": args.img_size,
        "num_classes": args.num_classes, "amp": args.amp, "warmup": args.warmup, "iters": args.iters,
        "keeps": args.keeps, "distill_keep": args.distill_keep, "student": args.student, "teachers": args.teachers,
        "sections": args.sections, "threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timer": "CUDA events after synchronize" if device.type == "cuda" else "time.perf_counter",
    }


def print_header(title: str, meta: Dict[str, Any], args: argparse.Namespace) -> None:
    print("=" * 100)
    print(f"{title}   {meta['date']}")
    print(f"  command : {meta['command']}")
    print(f"  device  : {meta['device']}   mode: {args.mode}   torch {torch.__version__}   timm {timm.__version__}")
    print(f"  batch {args.batch_size}, {args.img_size} px, {args.num_classes} classes, autocast {args.amp}, "
          f"warm-up {args.warmup}, median of {args.iters} interleaved repetitions ({meta['timer']})")
    print(f"  student : {short_name(args.student)}; teachers: {', '.join(short_name(t) for t in args.teachers)}")
    if meta["loadavg_start"] is not None:
        print(f"  load average at start: {', '.join(f'{v:.2f}' for v in meta['loadavg_start'])} "
              f"({os.cpu_count()} CPUs)")
    if args.iters < TIMING_ITERS_TO_REPORT:
        print(f"  NOTE: --iters {args.iters} < {TIMING_ITERS_TO_REPORT}: a smoke run, not figures to report")
    print("=" * 100, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = setup_device(args)
    meta = run_meta(args, device)
    print_header("MaskedKD supervision benchmark", meta, args)
    ctx = BenchContext(args)
    t_start = time.perf_counter()
    errors = {}
    for name in args.sections:
        t0 = time.perf_counter()
        print(f"\n-- section {SECTION_NAMES.index(name) + 1}: {name}", flush=True)
        section = SECTIONS[name]
        try:
            ctx.results[section.KEY] = section.run(ctx)
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
        print(f"   (section {name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    meta["total_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["errors"] = errors
    print(f"\ntotal {meta['total_s']:.1f} s"
          + (f"; load average at end {', '.join(f'{v:.2f}' for v in meta['loadavg_end'])}"
             if meta["loadavg_end"] else "")
          + (f"; FAILED sections: {errors}" if errors else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": ctx.results}, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if errors else 0
