"""Everything a lent GPU must measure, in one command, most important first, in at most 8 minutes of wall time.

  bash bench/gpu_session.sh                  # on the GPU machine: writes to $OUT, else output/gpu_session
  bash bench/gpu_session.sh --device cpu     # CPU smoke mode: the same code on toy models (tests/bench)
  python -m bench.gpu_session --plan         # expected H100 time of each part, from bench/gmac_gpu.json

Parts, in order (each teacher is one item; gpu_session.json and gpu_session.md are rewritten after every item, so
a run cut off at any point leaves every finished item on disk):
  capture  student train step with the attention hook on vs off (and the paper-code-style student)
  teacher  pruned teacher (plugin ``pruned_forward``) vs a hand-written timm gather at keep 1.0/0.75/0.5/0.25
  distill  the KD step at keep 0.5: DistillationLoss (full) vs MaskedDistillationLoss vs the ceiling
  paper    the same step against the paper-code-style baseline (explicit softmax attention in every block)
  probe    the same MaskedKD step with the fidelity probe off / at its default interval / at every step: the step's
           cost at the default interval (target <= 1.02), the probe's token share, the host syncs per step
  fast     the fast teacher: bf16 weights + torch.compile vs eager autocast, and a bf16 matmul ceiling
Peak memory (torch.cuda.max_memory_allocated) is recorded for every variant and every item.

Teachers: deit_base, deit3_large, deit3_huge and an EVA-02 one, random weights built by timm name (nothing is
downloaded). A teacher the plugin does not mask (``find_family`` finds no family) is skipped with that note.
Time: each part has a budget; a part or teacher starts only when the wall clock allows it, and the timing loops
stop early (at >= 3 repetitions, the JSON's ``n`` says how many) at the part's deadline. ``timeout`` in
gpu_session.sh interrupts a run past its limit; the interrupted item and the rest are then recorded as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, TextIO

import timm
import torch

from deit_patch.teachers import find_family

from . import flops
from .context import BenchContext
from .estimate import RATE_BF16, RATE_FP32, STARTUP_S, Estimate
from .models import parse_spec, short_name
from .report import fmt, markdown_table
from .sections import distill, fast, probe, student, teacher
from .session_tables import (done_items, items_of, render_capture, render_distill, render_fast, render_paper,
                             render_probe, render_teacher)
from .supervision import complete_args, print_header, run_meta, setup_device
from .timing import peak_seen_mib

DEFAULT_MAX_WALL_S = 480.0
RESERVE_S = 10.0  # kept back for writing the files and tearing down
EVA_TEACHER = {"gpu": "eva02_large_patch14_224",
               "smoke": "eva02_tiny_patch14_224:patch_size=6:depth=2:embed_dim=32:num_heads=2"}
SESSION_ITERS = {"gpu": 20, "smoke": 3}
TARGETS = {  # from the CPU sections of BENCHMARKS.md, restated there
    "capture_overhead": "<= 1.01 (student step with the hook / without)",
    "plugin_over_reference": "<= 1.03 (plugin pruned_forward / hand-written gather, worst keep)",
    "gap_to_ceiling_pp": "<= 2 pp (ceiling saving - MaskedDistillationLoss saving, keep 0.5)",
    "speedup_vs_paper": ">= 1.5x (paper-code-style step / ours, keep 0.5)",
    "probe_overhead": f"<= {probe.TARGET} (KD step with the probe at its default interval / without, amortised)",
    "fast_speedup": ">= 1.2x (eager autocast / bf16 + compile, keep 0.5)",
}


class Tee:
    """Writes to the terminal and to the session's log file."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    budget_s: float       # the most wall time the part may take (GPU mode)
    item_min_s: float     # start another teacher only with at least this much of the part's time left
    items: Callable[["Session"], List[str]]
    run_item: Callable[["Session", str], Any]
    render: Callable[[Dict[str, Any]], List[str]]


# --- the parts -------------------------------------------------------------------------------------------------
def _teachers(session: "Session") -> List[str]:
    return session.args.teachers + ([session.eva] if session.eva else [])


def _fast_teachers(session: "Session") -> List[str]:
    specs = fast.fast_specs(session.ctx)
    # Cheapest compile first (a figure for sure), then the largest teacher (the ANCHORS.md comparison), then the rest.
    return specs[:1] + specs[-1:] + specs[1:-1] if len(specs) > 2 else specs


def _run_capture(session: "Session", spec: str) -> Any:
    result = student.run(session.ctx)
    session.ctx.results[student.KEY] = result
    return result


def _run_teacher(session: "Session", spec: str) -> Any:
    entry = teacher.run(session.ctx, [spec])[0]
    session.ctx.results.setdefault(teacher.KEY, []).append(entry)
    return entry


def _run_distill(session: "Session", spec: str) -> Any:
    return distill.run(session.ctx, [spec], variants=("full", "masked", "ceiling"))[0]


def _run_paper(session: "Session", spec: str) -> Any:
    return distill.run(session.ctx, [spec], variants=("masked", "paper"))[0]


def _run_probe(session: "Session", spec: str) -> Any:
    return probe.run(session.ctx, [spec])[0]


def _run_fast(session: "Session", spec: str) -> Any:
    result = fast.run(session.ctx, [spec])
    entry = result["teachers"][0]
    entry["matmul_ceiling_tflops"] = result["matmul_ceiling_tflops"]
    entry["notes"] = result["notes"]
    return entry


PARTS: List[Part] = [
    Part("capture", "Capture overhead on the student step (hook on vs off)", 30, 10,
         lambda s: ["student"], _run_capture, render_capture),
    Part("teacher", "Pruned teacher vs hand-written gather (keep 1.0 / 0.75 / 0.5 / 0.25)", 95, 15,
         _teachers, _run_teacher, render_teacher),
    Part("distill", "KD step saving at keep 0.5 against the ceiling", 60, 15,
         _teachers, _run_distill, render_distill),
    Part("paper", "Ours vs the paper-code-style baseline (explicit attention), keep 0.5", 40, 10,
         _teachers, _run_paper, render_paper),
    # Late: the probe's cost is expected to be small; before 'fast', whose compile times are the least certain.
    Part("probe", "Fidelity probe on the KD step: off / default interval / every step, keep 0.5", 35, 8,
         _teachers, _run_probe, render_probe),
    Part("fast", "Fast teacher: bf16 weights + torch.compile vs eager autocast, keep 0.5", 190, 30,
         _fast_teachers, _run_fast, render_fast),
]
PART_NAMES = [p.name for p in PARTS]


# --- the session -----------------------------------------------------------------------------------------------
class Session:
    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        mode = "gpu" if opts.device.startswith("cuda") else "smoke"
        bench_args = argparse.Namespace(
            mode=mode, device=opts.device, section="teacher", warmup=None, iters=opts.iters or SESSION_ITERS[mode],
            keeps="1.0,0.75,0.5,0.25", distill_keep=0.5, teachers=None, student=None, fast_teachers=None,
            batch_size=None, img_size=None, num_classes=None, amp=None, no_compile=opts.no_compile,
            compile_backend="inductor", threads=None, seed=0, json=None)
        self.args = complete_args(bench_args)
        self.eva = None if opts.eva == "none" else (opts.eva or EVA_TEACHER[mode])
        self.parts = [p for p in PARTS if p.name in opts.parts]
        self.started = opts.started_at if opts.started_at is not None else time.time()
        self.max_wall_s = opts.max_wall_s
        self.ctx: Optional[BenchContext] = None
        self.estimate: Optional[Estimate] = None
        self._maskable: Dict[str, Optional[str]] = {}
        self.run_peak_mib: Optional[float] = None  # torch.cuda.max_memory_allocated, highest over the items
        os.makedirs(opts.out, exist_ok=True)
        self.json_path = os.path.join(opts.out, "gpu_session.json")
        self.md_path = os.path.join(opts.out, "gpu_session.md")
        self.record: Dict[str, Any] = {"meta": {}, "parts": {
            p.name: {"title": p.title, "status": "pending", "budget_s": p.budget_s, "items": {}} for p in self.parts}}

    def left_s(self) -> float:
        return self.started + self.max_wall_s - RESERVE_S - time.time()

    # --- output ----------------------------------------------------------------------------------------------
    def write(self) -> None:
        self.record["meta"]["wall_s"] = time.time() - self.started
        if self.run_peak_mib is not None:
            self.record["meta"]["max_memory_allocated_mib"] = self.run_peak_mib
        self._write_file(self.json_path, json.dumps(self.record, indent=1, default=str))
        try:
            text = self.markdown()
        except Exception as exc:  # noqa: BLE001 - the JSON is on disk; a table bug must not end the run
            traceback.print_exc()
            text = f"## GPU session\n\nThe Markdown could not be rendered ({type(exc).__name__}: {exc}); see the JSON."
        self._write_file(self.md_path, text)

    @staticmethod
    def _write_file(path: str, text: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)  # a run killed mid-write leaves the previous complete file

    def markdown(self) -> str:
        meta = self.record["meta"]
        lines = [f"## GPU session: {meta.get('device', '?')} ({meta.get('date', '?')})", "",
                 f"`{meta.get('command', '')}`: mode {meta.get('mode')}, torch {meta.get('torch')}, timm "
                 f"{meta.get('timm')}, batch {meta.get('batch_size')}, {meta.get('img_size')} px, autocast "
                 f"{meta.get('amp')}, median of {meta.get('iters')} interleaved repetitions after {meta.get('warmup')}"
                 f" warm-up; wall time so far {meta.get('wall_s', 0):.0f} s of {self.max_wall_s:.0f} s; peak "
                 f"allocated {fmt(meta.get('max_memory_allocated_mib'), '.0f')} MiB.", "",
                 "### Against the targets", ""]
        if meta.get("mode") != "gpu":
            lines += [f"Mode {meta.get('mode')}: toy models and a few repetitions on a CPU. These numbers check that "
                      "every code path runs; they say nothing about the targets.", ""]
        lines += [markdown_table(["figure", "measured", "target", "met"], self.targets()), ""]
        for part in self.parts:
            rec = self.record["parts"][part.name]
            lines += [f"### {part.name}: {part.title}", "",
                      f"Status: {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else "")
                      + (f"; {rec['elapsed_s']:.0f} s of a {part.budget_s:.0f} s budget" if "elapsed_s" in rec
                         else "") + (f"; expected on an H100 {rec['expected_h100_s']:.0f} s"
                                     if rec.get("expected_h100_s") else "") + ".", ""]
            body = part.render(rec)
            if body:
                lines += body + [""]
            for spec, item in items_of(rec):
                if item["status"] != "done":
                    lines.append(f"- {short_name(spec)}: {item['status']}: {item.get('reason', '')}")
            lines += [""]
        mem = [[name, short_name(spec), fmt(item.get("peak_allocated_mib"), ".0f"), fmt(item.get("elapsed_s"), ".1f")]
               for name, rec in self.record["parts"].items() for spec, item in items_of(rec)
               if item["status"] == "done"]
        lines += ["### Peak memory and time per item", "",
                  "torch.cuda.max_memory_allocated over the item (models resident included); per-variant peaks "
                  "above the resident memory are in the tables above.", "",
                  markdown_table(["part", "item", "peak allocated MiB", "s"], mem), ""]
        return "\n".join(lines)

    def targets(self) -> List[List[str]]:
        """One row per measured figure with a target: name, value, target, whether it is met."""
        parts = self.record["parts"]

        def done(name):
            return done_items(parts[name]) if name in parts else []

        figures = []  # (figure, value, text, target key, met)
        for _, res in done("capture"):
            value = res["capture"]["ratio_vs_plain_paired"]
            figures.append(("capture overhead (student step)", fmt(value, ".3f"), "capture_overhead", value <= 1.01))
        for spec, res in done("teacher"):
            worst = max(k["ratio_plugin_over_reference_paired"] for k in res["keeps"])
            figures.append((f"plugin / hand gather, {short_name(spec)}", fmt(worst, ".3f"), "plugin_over_reference",
                            worst <= 1.03))
        for spec, res in done("distill"):
            figures.append((f"gap to the ceiling, {short_name(spec)}", f"{res['gap_pp']:+.1f} pp",
                            "gap_to_ceiling_pp", res["gap_pp"] <= 2.0))
        for spec, res in done("paper"):
            value = res["speedup_ours_vs_paper"]
            figures.append((f"ours vs paper-code style, {short_name(spec)}", fmt(value, ".3f"), "speedup_vs_paper",
                            value >= 1.5))
        for spec, res in done("probe"):
            value = res["overhead_amortised"]
            figures.append((f"probe at its default interval (every {res['probe_every']}), {short_name(spec)}",
                            fmt(value, ".4f"), "probe_overhead", value <= probe.TARGET))
        for spec, res in done("fast"):
            v = res["variants"].get("keep, bf16 + compile")
            value = 1 / v["ratio_vs_eager_autocast_paired"] if v else None
            figures.append((f"bf16 + compile speed-up, {short_name(spec)}", fmt(value, ".3f"), "fast_speedup",
                            None if value is None else value >= 1.2))
        return [[name, text, TARGETS[key], {True: "yes", False: "no", None: "n/a"}[met]]
                for name, text, key, met in figures]

    # --- running -------------------------------------------------------------------------------------------------
    def unmaskable(self, spec: str) -> Optional[str]:
        """Why this teacher cannot be measured here (None: it can): no such timm model, or the plugin does not mask
        it. Builds the teacher (random weights) to ask the plugin."""
        if spec not in self._maskable:
            name, _ = parse_spec(spec)
            reason = None
            if not timm.list_models(name):
                reason = f"timm {timm.__version__} has no model {name}"
            else:
                model = self.ctx.teacher(spec)
                if find_family(model) is None:
                    self.ctx.drop_teacher(spec)
                    reason = (f"the plugin does not mask {type(model).__name__} teachers yet "
                              "(deit_patch.teachers.find_family finds no family): skipped until it does")
            self._maskable[spec] = reason
        return self._maskable[spec]

    def run(self) -> int:
        device = setup_device(self.args)
        meta = run_meta(self.args, device)
        meta.update(parts=[p.name for p in self.parts], eva_teacher=self.eva, max_wall_s=self.max_wall_s,
                    started_at=self.started, targets=TARGETS)
        self.record["meta"] = meta
        print_header("MaskedKD GPU session", meta, self.args)
        self.ctx = BenchContext(self.args)
        table = flops.load_table()
        if self.args.mode == "gpu" and table is not None and table.get("mode") == "gpu":
            self.ctx.gmac_table = table["counts"]
            self.estimate = Estimate(table, self.args)
            meta["gmac_table"] = f"bench/gmac_gpu.json (timm {table.get('timm')}, torch {table.get('torch')})"
        self.write()
        status = 0
        pending = list(self.parts)
        try:
            while pending:
                part = pending.pop(0)
                status |= self.run_part(part)
        except KeyboardInterrupt:
            print("\n!! interrupted (hard wall-clock limit): recording what is left as skipped", flush=True)
            reason = "interrupted by the hard wall-clock limit (timeout in gpu_session.sh)"
            for part in [p for p in self.parts if self.record["parts"][p.name]["status"] in ("pending", "running")]:
                rec = self.record["parts"][part.name]
                for item in rec["items"].values():
                    if item["status"] in ("pending", "running"):
                        item.update(status="skipped", reason=reason)
                self._close_part(rec, reason)
            status = 1
        self.write()
        print(f"\nwrote {self.json_path} and {self.md_path} ({time.time() - self.started:.0f} s since the start)")
        return status

    def run_part(self, part: Part) -> int:
        rec = self.record["parts"][part.name]
        t0 = time.time()
        left = self.left_s()
        if left < part.item_min_s:
            rec.update(status="skipped", reason=f"wall-clock guard: {max(left, 0):.0f} s left of {self.max_wall_s:.0f}"
                                                f" s, the part needs at least {part.item_min_s:.0f} s")
            self.write()
            return 0
        part_end = t0 + min(part.budget_s, left)
        self.ctx.deadline = time.perf_counter() + (part_end - t0)
        specs = part.items(self)
        rec["status"] = "running"
        for spec in specs:
            rec["items"][spec] = {"status": "pending"}
        if self.estimate is not None:
            rec["expected_h100_s"] = sum(self._expected(part.name, s) or 0.0 for s in specs)
        print(f"\n-- part {part.name}: {part.title} (budget {min(part.budget_s, left):.0f} s)", flush=True)
        failed = 0
        for spec in specs:
            item = rec["items"][spec]
            need = max(part.item_min_s, self._expected(part.name, spec) or 0.0)
            item_left = part_end - time.time()
            if item_left < need:
                item.update(status="skipped", reason=f"time budget: {max(item_left, 0):.0f} s left of the part's "
                                                     f"{part.budget_s:.0f} s, this item needs about {need:.0f} s")
                self.write()
                continue
            item["status"] = "running"
            i0 = time.time()
            peak_seen_mib(reset=True)
            try:
                reason = None if spec == "student" else self.unmaskable(spec)
                if reason:
                    item.update(status="skipped", reason=reason)
                    print(f"   skipped {short_name(spec)}: {reason}", flush=True)
                else:
                    item.update(status="done", result=part.run_item(self, spec))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken item must not hide the others
                traceback.print_exc()
                item.update(status="error", reason=f"{type(exc).__name__}: {exc}")
                failed = 1
            item["elapsed_s"] = time.time() - i0
            item["peak_allocated_mib"] = peak = peak_seen_mib() if self.ctx.device.type == "cuda" else None
            if peak is not None:
                self.run_peak_mib = max(self.run_peak_mib or 0.0, peak)
            rec["elapsed_s"] = time.time() - t0
            self.write()
        self._close_part(rec, None)
        rec["elapsed_s"] = time.time() - t0
        self.ctx.deadline = None
        self.write()
        return failed

    def _expected(self, part: str, spec: str) -> Optional[float]:
        if self.estimate is None:
            return None
        try:
            return self.estimate.item_s(part, spec)
        except KeyError:
            return None

    @staticmethod
    def _close_part(rec: Dict[str, Any], reason: Optional[str]) -> None:
        states = [item["status"] for item in rec["items"].values()]
        if "error" in states:
            rec["status"] = "error"
        elif states and all(s == "skipped" for s in states):
            rec["status"] = "skipped"
            rec["reason"] = reason or "every item skipped: " + "; ".join(
                sorted({item["reason"] for item in rec["items"].values()}))
        elif reason and not states:
            rec.update(status="skipped", reason=reason)
        else:
            rec["status"] = "done"


def print_plan(opts: argparse.Namespace) -> int:
    table = flops.load_table()
    if table is None:
        print(f"no {flops.TABLE_PATH}: write it with python -m bench.flops --mode gpu --write {flops.TABLE_PATH}",
              file=sys.stderr)
        return 2
    args = complete_args(argparse.Namespace(
        mode="gpu", device="cuda", section="teacher", warmup=None, iters=opts.iters or SESSION_ITERS["gpu"],
        keeps="1.0,0.75,0.5,0.25", distill_keep=0.5, teachers=None, student=None, fast_teachers=None,
        batch_size=None, img_size=None, num_classes=None, amp=None, no_compile=False, compile_backend="inductor",
        threads=None, seed=0, json=None))
    est = Estimate(table, args)
    eva = None if opts.eva == "none" else (opts.eva or EVA_TEACHER["gpu"])
    teachers = args.teachers + ([eva] if eva in table.get("models", {}) else [])
    fast_order = args.teachers[:1] + args.teachers[-1:] + args.teachers[1:-1]
    items = {"capture": ["student"], "teacher": teachers, "distill": teachers, "paper": teachers,
             "probe": teachers, "fast": fast_order}
    print(f"Expected H100 wall time per item (batch {args.batch_size}, {args.img_size} px, {args.warmup}+{args.iters}"
          f" repetitions; floor = FLOP time at {RATE_BF16 / 1e12:.0f} TFLOP/s bf16, {RATE_FP32 / 1e12:.0f} fp32; "
          "expected = calibrated on ANCHORS.md's H100 times, compiles guessed)")
    print(f"  {'part':<9} {'item':<26} {'floor s':>8} {'expected s':>10}  plan (part budget, wall clock)")
    clock = STARTUP_S
    total_floor = total = 0.0
    print(f"  {'startup':<9} {'':<26} {'':>8} {STARTUP_S:>10.1f}")
    for part in PARTS:
        used = 0.0
        for spec in items[part.name]:
            floor, expected = est.item_s(part.name, spec, floor=True), est.item_s(part.name, spec)
            fits = used + max(part.item_min_s, expected) <= part.budget_s and clock + expected <= \
                DEFAULT_MAX_WALL_S - RESERVE_S
            note = "runs" if fits else "skipped by the time budget"
            if fits:
                used += expected
                clock += expected
                total_floor += floor
                total += expected
            print(f"  {part.name:<9} {short_name(spec):<26} {floor:>8.1f} {expected:>10.1f}  {note}")
        print(f"  {'':<9} {'= ' + part.name + ' (budget ' + format(part.budget_s, '.0f') + ' s)':<26} {'':>8} "
              f"{used:>10.1f}")
    print(f"  total of the items that run: floor {total_floor:.0f} s, expected {total:.0f} s + {STARTUP_S:.0f} s "
          f"start-up = {total + STARTUP_S:.0f} s of {DEFAULT_MAX_WALL_S:.0f} s")
    return 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (the real run) or cpu (smoke mode); default: cuda if any")
    p.add_argument("--out", default=None, help="folder for gpu_session.json/.md/.log (default: $OUT, else "
                                               "output/gpu_session)")
    p.add_argument("--parts", default=",".join(PART_NAMES), help=f"comma list of {','.join(PART_NAMES)}")
    p.add_argument("--max-wall-s", type=float, default=DEFAULT_MAX_WALL_S,
                   help="wall-clock limit of the whole run, counted from --started-at")
    p.add_argument("--started-at", type=float, default=None, help="epoch seconds the run began (gpu_session.sh)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (default 20; smoke mode 3)")
    p.add_argument("--eva", default=None, help="the EVA-02 teacher's timm spec, or 'none'")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile in the fast part")
    p.add_argument("--plan", action="store_true", help="print the expected H100 time per part and exit")
    opts = p.parse_args(argv)
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.out is None:
        opts.out = os.environ.get("OUT") or os.path.join("output", "gpu_session")
    opts.parts = [s.strip() for s in opts.parts.split(",") if s.strip()]
    unknown = [s for s in opts.parts if s not in PART_NAMES]
    if unknown:
        p.error(f"unknown part(s) {unknown}: choose from {PART_NAMES}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device: run on the GPU machine, or --device cpu (smoke mode)")
    return opts


def main(argv: Optional[List[str]] = None) -> int:
    opts = parse_args(argv)
    if opts.plan:
        return print_plan(opts)
    session = Session(opts)
    with open(os.path.join(opts.out, "gpu_session.log"), "a") as log:
        sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
        try:
            return session.run()
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


if __name__ == "__main__":
    sys.exit(main())
