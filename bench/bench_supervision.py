#!/usr/bin/env python
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

Every ratio compares variants timed in the same process, interleaved round-robin inside each repetition (the
starting variant rotates), so drifting load hits them alike; the figures are medians over ``--iters`` repetitions
after ``--warmup``. GPU: CUDA events around each call after a synchronize. CPU: time.perf_counter.

FLOP convention: fvcore counts one multiply-add as one "FLOP" (so DeiT-B is 17.6 "GFLOPs"); the tables call
that unit GMAC. Achieved throughput is reported in real FLOP/s = 2 x MAC/s, the unit a matmul's 2*n^3 is in.

  python bench/bench_supervision.py                       # CPU mode when no CUDA: small models, ~minutes
  python bench/bench_supervision.py --mode gpu --json out.json
  python bench/bench_supervision.py --section teacher,fast --iters 30
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deit_patch.capture import AttentionCapture  # noqa: E402
from deit_patch.cost import student_gflops, teacher_gflops  # noqa: E402
from deit_patch.features import heads_gflops  # noqa: E402
from deit_patch.masking import resample_scores, resolve_num_keep, topk_indices  # noqa: E402
from deit_patch.teachers import pruned_forward, require_family, teacher_grid  # noqa: E402
from losses import DistillationLoss, MaskedDistillationLoss, soft_kd  # noqa: E402

SECTIONS = ("teacher", "student", "distill", "cost", "fast", "vitkd", "compiled")

# Real sizes (ANCHORS.md) and a CPU stand-in with the same three code paths: a ViT/DeiT teacher (class token inside
# the position embedding), a DeiT-III one (no_embed_class) and a patch-14-like one whose grid differs from the
# student's (teacher patch 7 -> 9x9 against student patch 8 -> 8x8 at 64 px, as 16x16 vs 14x14 at 224 px). The CPU
# sizes are chosen for a run of a few minutes on one core, not for realistic ratios. CPU mode runs one thread by
# default: with other processes on a 2-core machine, every OpenMP barrier across 2 threads can wait a whole
# scheduler slice (we saw 10-15x slow-downs quantised in ~4 ms steps), which wrecks ratios; one thread only slows.
MODES: Dict[str, Dict[str, Any]] = {
    "gpu": dict(batch_size=256, img_size=224, num_classes=1000, warmup=5, amp="bf16", threads=None,
                student="deit_small_patch16_224",
                teachers="deit_base_patch16_224,deit3_large_patch16_224,deit3_huge_patch14_224",
                fast_teachers="all"),
    "cpu": dict(batch_size=8, img_size=64, num_classes=100, warmup=2, amp="none", threads=1,
                student="deit_tiny_patch16_224:patch_size=8:depth=4",
                teachers=("deit_small_patch16_224:patch_size=8:depth=3,"
                          "deit3_small_patch16_224:patch_size=8:depth=4,"
                          "deit3_medium_patch16_224:patch_size=7:depth=3"),
                fast_teachers="first"),
}


# --- models --------------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """'name:key=value:key=value' -> (timm name, create_model overrides)."""
    name, *parts = spec.strip().split(":")
    overrides: Dict[str, Any] = {}
    for part in parts:
        key, _, value = part.partition("=")
        if not _:
            raise SystemExit(f"bad model spec {spec!r}: write name:key=value:key=value")
        for cast in (int, float):
            try:
                overrides[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            overrides[key] = {"true": True, "false": False}.get(value.lower(), value)
    return name, overrides


def short_name(spec: str) -> str:
    name, overrides = parse_spec(spec)
    abbrev = {"patch_size": "p", "depth": "d", "embed_dim": "w", "num_heads": "h"}
    extra = ",".join(f"{abbrev.get(k, k)}{v}" for k, v in overrides.items())
    return f"{name}[{extra}]" if extra else name


def build_model(spec: str, *, img_size: int, num_classes: int, device: torch.device) -> nn.Module:
    name, overrides = parse_spec(spec)
    kwargs = dict(pretrained=False, img_size=img_size, num_classes=num_classes, **overrides)
    try:
        with torch.device(device):  # initialise on the device: a 632M-parameter init on CPU takes a while
            model = timm.create_model(name, **kwargs)
    except Exception:  # noqa: BLE001 - some init code does not like a device context; build on CPU then
        model = timm.create_model(name, **kwargs).to(device)
    return model


def set_fused_attn(model: nn.Module, value: bool) -> nn.Module:
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn") and isinstance(getattr(module, "qkv", None), nn.Linear):
            module.fused_attn = value
            count += 1
    if not count:
        raise RuntimeError(f"{type(model).__name__} has no timm Attention module to switch")
    return model


def reference_forward(model: nn.Module, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Plain timm code, written out: embed, gather the kept patch tokens after the position embedding, run."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    prefix = model.num_prefix_tokens
    index = keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    x = torch.cat([x[:, :prefix], torch.gather(x[:, prefix:], 1, index)], dim=1)
    x = model.norm_pre(x)
    x = model.blocks(x)
    x = model.norm(x)
    return model.forward_head(x)


class MapHook:
    """Paper-code style: keep the last block's full (B, H, N, N) softmax map (forward hook on ``attn_drop``)."""

    def __init__(self, attention: nn.Module):
        self.map: Optional[torch.Tensor] = None
        self.handle = attention.attn_drop.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.map = output

    def cls_row(self, prefix: int) -> torch.Tensor:
        attn, self.map = self.map, None
        if attn is None:
            raise RuntimeError("the explicit-attention student did not run its last attention (fused_attn still on?)")
        return attn[:, :, 0, prefix:].float().mean(dim=1)


# --- timing ----------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


@dataclass
class Stat:
    samples: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        pos = q * (len(s) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    def as_dict(self) -> Dict[str, Any]:
        return {"median_ms": self.median, "p25_ms": self.quantile(0.25), "p75_ms": self.quantile(0.75),
                "min_ms": min(self.samples), "n": len(self.samples), "samples_ms": [round(v, 4) for v in self.samples]}


def interleaved(variants: Dict[str, Callable[[], Any]], *, warmup: int, iters: int, clock: Clock,
                label: str = "") -> Dict[str, Stat]:
    """Each repetition runs every variant once, starting one further along each time (round-robin)."""
    names = list(variants)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for rep in range(warmup + iters):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            ms = clock(variants[name])
            if rep >= warmup:
                samples[name].append(ms)
    if label:
        print(f"    [{label}: {len(names)} variants x {warmup}+{iters} reps in {time.perf_counter() - t0:.1f} s]",
              flush=True)
    return {n: Stat(samples[n]) for n in names}


def paired_ratio(a: Stat, b: Stat) -> float:
    """Median over repetitions of a_i / b_i (the two were timed back to back in repetition i)."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))


def peak_extra_mib(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak memory one call allocates above what was resident before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- output ----------------------------------------------------------------------------------------------------
def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return format(value, spec)


def print_table(title: str, header: List[str], rows: List[List[Any]], *, left: int = 2) -> None:
    """Plain-text table; the first ``left`` columns are labels (left-aligned), the rest numbers."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    line = "  " + "  ".join(("{:<%d}" if i < left else "{:>%d}") % w for i, w in enumerate(widths))
    print(line.format(*cells[0]))
    print("  " + "  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line.format(*row))


# --- the run -------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.clock = Clock(self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
        self.img = (args.img_size, args.img_size)
        self.results: Dict[str, Any] = {}
        self._teachers: Dict[str, nn.Module] = {}
        self._student: Optional[nn.Module] = None
        self._flops: Dict[Tuple[str, Optional[int]], float] = {}
        gen = torch.Generator().manual_seed(args.seed)
        self.x = torch.randn(args.batch_size, 3, *self.img, generator=gen).to(self.device)
        self.y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(self.device)

    # models, built once and shared by the sections
    def amp(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def teacher(self, spec: str) -> nn.Module:
        if spec not in self._teachers:
            t0 = time.perf_counter()
            model = build_model(spec, img_size=self.args.img_size, num_classes=self.args.num_classes,
                                device=self.device).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._teachers[spec] = model
            print(f"    [built teacher {short_name(spec)}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
                  f"params, grid {teacher_grid(model)}, {time.perf_counter() - t0:.1f} s]", flush=True)
        return self._teachers[spec]

    def student(self) -> nn.Module:
        """A fresh copy of one randomly initialised student (each variant trains its own copy)."""
        if self._student is None:
            self._student = build_model(self.args.student, img_size=self.args.img_size,
                                        num_classes=self.args.num_classes, device=self.device).train()
        return copy.deepcopy(self._student).train()

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        # A tiny learning rate: random data for many steps must not drive the weights to inf/NaN.
        return torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)

    def gmac(self, model: nn.Module, key: Tuple[str, Optional[int]], *, kind: str) -> float:
        if key not in self._flops:
            if kind == "student":
                self._flops[key] = student_gflops(model, img_size=self.img)
            else:
                self._flops[key] = teacher_gflops(model, img_size=self.img, num_keep=key[1])
        return self._flops[key]

    def num_keep(self, teacher: nn.Module, keep: float) -> int:
        rows, cols = teacher_grid(teacher)
        return resolve_num_keep(num_patches=rows * cols, keep_ratio=keep, num_keep=None)

    def random_keep_idx(self, teacher: nn.Module, num_keep: int) -> torch.Tensor:
        rows, cols = teacher_grid(teacher)
        gen = torch.Generator().manual_seed(self.args.seed + num_keep)
        noise = torch.rand(self.args.batch_size, rows * cols, generator=gen)
        return topk_indices(noise, num_keep).to(self.device)

    def teacher_tol(self) -> float:
        return 1e-4 if self.amp_dtype is None else 5e-2

    def _time(self, variants, label):
        return interleaved(variants, warmup=self.args.warmup, iters=self.args.iters, clock=self.clock, label=label)

    def throughput(self, ms: float) -> float:
        return self.args.batch_size / (ms / 1e3)

    # --- 1 -----------------------------------------------------------------------------------------------------
    def section_teacher(self) -> None:
        rows, out = [], []
        for spec in self.args.teachers:
            teacher = self.teacher(spec)
            family = require_family(teacher)
            grid = teacher_grid(teacher)
            patches = grid[0] * grid[1]
            x = self.x
            variants: Dict[str, Callable[[], Any]] = {}

            def full(teacher=teacher):
                with torch.no_grad(), self.amp():
                    return teacher(x)

            variants["full"] = full
            keeps = {}
            for keep in self.args.keeps:
                k = self.num_keep(teacher, keep)
                idx = self.random_keep_idx(teacher, k)
                keeps[keep] = (k, idx)

                def plugin(teacher=teacher, idx=idx):
                    with torch.no_grad(), self.amp():
                        return pruned_forward(teacher, x, idx, family)

                def reference(teacher=teacher, idx=idx):
                    with torch.no_grad(), self.amp():
                        return reference_forward(teacher, x, idx)

                variants[f"plugin@{keep}"] = plugin
                variants[f"ref@{keep}"] = reference
                # The two must compute the same thing before their times mean anything.
                a, b = plugin().float(), reference().float()
                err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
                if err > self.teacher_tol():
                    raise RuntimeError(f"{short_name(spec)} keep {keep}: plugin and reference logits differ "
                                       f"(max rel err {err:.3g})")
                if k == patches:
                    err_full = (a - full().float()).abs().max().item() / max(a.abs().max().item(), 1e-6)
                    if err_full > self.teacher_tol():
                        raise RuntimeError(f"{short_name(spec)}: keeping every patch differs from teacher(x) "
                                           f"(max rel err {err_full:.3g})")
            stats = self._time(variants, f"teacher {short_name(spec)}")
            peak = {n: peak_extra_mib(fn, self.device) for n, fn in variants.items()}
            full_ms = stats["full"].median
            rows.append([short_name(spec), "teacher(x)", f"{patches}/{patches}", fmt(full_ms), "", "",
                         fmt(self.throughput(full_ms), ".0f"), "1.000", fmt(peak["full"], ".0f")])
            entry = {"teacher": spec, "grid": list(grid), "num_patches": patches, "family": family.name,
                     "full": {**stats["full"].as_dict(), "images_per_s": self.throughput(full_ms),
                              "peak_extra_mib": peak["full"]}, "keeps": []}
            for keep, (k, _) in keeps.items():
                p, r = stats[f"plugin@{keep}"], stats[f"ref@{keep}"]
                ratio = paired_ratio(p, r)
                rows.append([short_name(spec), f"{keep:g}", f"{k}/{patches}", fmt(p.median), fmt(r.median),
                             fmt(ratio, ".3f"), fmt(self.throughput(p.median), ".0f"),
                             fmt(p.median / full_ms, ".3f"), fmt(peak[f"plugin@{keep}"], ".0f")])
                entry["keeps"].append({"keep": keep, "num_keep": k, "plugin": p.as_dict(), "reference": r.as_dict(),
                                       "ratio_plugin_over_reference_paired": ratio,
                                       "ratio_plugin_over_reference_medians": p.median / r.median,
                                       "plugin_over_full": p.median / full_ms,
                                       "images_per_s": self.throughput(p.median),
                                       "peak_extra_mib": peak[f"plugin@{keep}"],
                                       "peak_extra_mib_reference": peak[f"ref@{keep}"]})
            out.append(entry)
        print_table("1. Teacher forward (no grad, eval): plugin pruned_forward vs hand-written timm gather",
                    ["teacher", "keep", "patches", "plugin ms", "ref ms", "plugin/ref", "img/s", "vs full",
                     "peak MiB"], rows)
        print("  plugin/ref = median over repetitions of the paired ratio (ratio of medians in the JSON); "
              "vs full = plugin / unmodified teacher(x); img/s of the plugin")
        self.results["teacher_forward"] = out

    # --- 2 -----------------------------------------------------------------------------------------------------
    def _train_step(self, model: nn.Module, opt: torch.optim.Optimizer,
                    loss_fn: Callable[[Any], torch.Tensor]) -> Callable[[], None]:
        x = self.x

        def step():
            with self.amp():
                out = model(x)
                loss = loss_fn(out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def section_student(self) -> None:
        y, batch = self.y, self.args.batch_size
        plain, hooked, paper = self.student(), self.student(), set_fused_attn(self.student(), False)
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

        variants = {"plain": self._train_step(plain, self.optimizer(plain), ce),
                    "capture": self._train_step(hooked, self.optimizer(hooked), ce_take),
                    "paper": self._train_step(paper, self.optimizer(paper), ce_map)}
        try:
            stats = self._time(variants, "student step")
            peak = {n: peak_extra_mib(fn, self.device) for n, fn in variants.items()}
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
                         fmt(self.throughput(stat.median), ".0f"), fmt(ratio, ".3f"), fmt(peak[name], ".0f")])
            out[name] = {**stat.as_dict(), "ratio_vs_plain_paired": ratio,
                         "images_per_s": self.throughput(stat.median), "peak_extra_mib": peak[name]}
        print_table(f"2. Student train step (fwd+bwd+AdamW), {short_name(self.args.student)}",
                    ["variant", "ms", "p25", "p75", "img/s", "vs plain", "peak MiB"], rows, left=1)
        self.results["student_step"] = {"student": self.args.student, **out}

    # --- 3 -----------------------------------------------------------------------------------------------------
    def section_distill(self) -> None:
        args, x, y, batch = self.args, self.x, self.y, self.args.batch_size
        keep, alpha, tau = args.distill_keep, 0.5, 1.0
        s_full, s_masked, s_ceil = self.student(), self.student(), self.student()
        s_paper = set_fused_attn(self.student(), False)
        opts = {id(m): self.optimizer(m) for m in (s_full, s_masked, s_ceil, s_paper)}
        maps = MapHook(s_paper.blocks[-1].attn)
        s_prefix = int(s_paper.num_prefix_tokens)
        s_grid = tuple(int(g) for g in s_paper.patch_embed.grid_size)
        rows, out = [], []
        try:
            for spec in args.teachers:
                teacher = self.teacher(spec)
                family = require_family(teacher)
                t_grid = teacher_grid(teacher)
                k = self.num_keep(teacher, keep)
                fixed_idx = self.random_keep_idx(teacher, k)
                t_paper = set_fused_attn(copy.deepcopy(teacher), False).eval()
                full_crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha, tau, student=s_full)
                masked_crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha, tau,
                                                     student=s_masked, keep_ratio=keep, mask_mode="attention")
                assert masked_crit.num_keep == k, (masked_crit.num_keep, k)

                def ceiling_loss(out):
                    with torch.no_grad():
                        t_out = pruned_forward(teacher, x, fixed_idx, family)
                    return F.cross_entropy(out, y) * (1 - alpha) + soft_kd(out, t_out, tau=tau,
                                                                           reduction="numel") * alpha

                def paper_loss(out, t_paper=t_paper, t_grid=t_grid, k=k):
                    with torch.no_grad():
                        scores = maps.cls_row(s_prefix)
                        scores = resample_scores(scores, src_grid=s_grid, dst_grid=t_grid)
                        idx = topk_indices(scores, k)
                        t_out = reference_forward(t_paper, x, idx)
                    return F.cross_entropy(out, y) * (1 - alpha) + soft_kd(out, t_out, tau=tau,
                                                                           reduction="numel") * alpha

                variants = {
                    "full": self._train_step(s_full, opts[id(s_full)], lambda out: full_crit(x, out, y)),
                    "masked": self._train_step(s_masked, opts[id(s_masked)], lambda out: masked_crit(x, out, y)),
                    "ceiling": self._train_step(s_ceil, opts[id(s_ceil)], ceiling_loss),
                    "paper": self._train_step(s_paper, opts[id(s_paper)], paper_loss),
                }
                try:
                    stats = self._time(variants, f"distill {short_name(spec)}")
                    peak = {n: peak_extra_mib(fn, self.device) for n, fn in variants.items()}
                finally:
                    masked_crit.remove_hooks()
                    del t_paper
                full_ms = stats["full"].median
                saving = {n: 1 - paired_ratio(stats[n], stats["full"]) for n in stats}
                speedup_vs_paper = paired_ratio(stats["paper"], stats["masked"])
                labels = {"full": "DistillationLoss, full teacher",
                          "masked": f"MaskedDistillationLoss keep {keep:g} (attention)",
                          "ceiling": f"ceiling: student step + pruned teacher, fixed idx",
                          "paper": "paper-code style (explicit attn, map hook)"}
                entry = {"teacher": spec, "keep": keep, "num_keep": k, "variants": {},
                         "saving_ours": saving["masked"], "saving_ceiling": saving["ceiling"],
                         "gap_pp": 100 * (saving["ceiling"] - saving["masked"]),
                         "speedup_ours_vs_paper": speedup_vs_paper}
                for name, stat in stats.items():
                    rows.append([short_name(spec), labels[name], fmt(stat.median),
                                 fmt(self.throughput(stat.median), ".0f"), fmt(stat.median / full_ms, ".3f"),
                                 f"{100 * saving[name]:.1f}%", fmt(peak[name], ".0f")])
                    entry["variants"][name] = {**stat.as_dict(), "images_per_s": self.throughput(stat.median),
                                               "saving_vs_full_paired": saving[name], "peak_extra_mib": peak[name]}
                additive = self._additive_ceiling(spec, keep)
                if additive is not None:
                    entry["saving_ceiling_additive"] = additive
                out.append(entry)
        finally:
            maps.handle.remove()
        print_table(f"3. Distillation step (student {short_name(args.student)} fwd+bwd+AdamW + teacher)",
                    ["teacher", "variant", "ms", "img/s", "vs full", "saved", "peak MiB"], rows)
        summary = []
        for e in out:
            summary.append([short_name(e["teacher"]), f"{100 * e['saving_ours']:.1f}%",
                            f"{100 * e['saving_ceiling']:.1f}%", f"{e['gap_pp']:+.1f}",
                            f"{100 * e['saving_ceiling_additive']:.1f}%" if "saving_ceiling_additive" in e else "n/a",
                            fmt(e["speedup_ours_vs_paper"], ".3f")])
        print_table(f"   summary at keep {keep:g}",
                    ["teacher", "ours saved", "ceiling saved", "gap pp", "additive ceil", "ours vs paper x"],
                    summary, left=1)
        print("  saved = 1 - step/full-step (paired median); gap pp = ceiling - ours; additive ceil = ANCHORS.md's "
              "(student step + teacher@keep) / (student step + full teacher) from sections 1-2 when run; "
              "ours vs paper x = paper-style step time / ours")
        self.results["distill_step"] = out

    def _additive_ceiling(self, spec: str, keep: float) -> Optional[float]:
        student = self.results.get("student_step", {}).get("plain")
        for entry in self.results.get("teacher_forward", []):
            if entry["teacher"] != spec or student is None:
                continue
            for k in entry["keeps"]:
                if abs(k["keep"] - keep) < 1e-9:
                    s = student["median_ms"]
                    return 1 - (s + k["plugin"]["median_ms"]) / (s + entry["full"]["median_ms"])
        return None

    # --- 4 -----------------------------------------------------------------------------------------------------
    def section_cost(self) -> None:
        args = self.args
        t0 = time.perf_counter()
        student = self.student()
        s_fwd = self.gmac(student, ("student", None), kind="student")
        s_paper = student_gflops(set_fused_attn(self.student(), False), img_size=self.img)
        s_train = 3 * s_fwd
        rows, out = [], {"student_fwd_gmac": s_fwd, "student_train_gmac": s_train,
                         "student_paper_fwd_gmac": s_paper, "teachers": []}

        def achieved(gmac_img: float, ms: Optional[float]) -> Optional[float]:
            return None if ms is None else 2 * gmac_img * 1e9 * args.batch_size / (ms / 1e3) / 1e12

        st = self.results.get("student_step", {})
        s_ms = st.get("plain", {}).get("median_ms")
        rows.append(["student", "train step (3x fwd)", fmt(s_fwd, ".3f"), fmt(s_train, ".3f"), fmt(s_ms),
                     fmt(None if s_ms is None else self.throughput(s_ms), ".0f"), fmt(achieved(s_train, s_ms), ".3f"),
                     fmt(st.get("plain", {}).get("peak_extra_mib"), ".0f")])
        tf = {e["teacher"]: e for e in self.results.get("teacher_forward", [])}
        ds = {e["teacher"]: e for e in self.results.get("distill_step", [])}
        for spec in args.teachers:
            teacher = self.teacher(spec)
            name = short_name(spec)
            full = self.gmac(teacher, (spec, None), kind="teacher")
            entry = {"teacher": spec, "full_gmac": full, "keeps": {}}
            t_entry = tf.get(spec)
            ms = t_entry["full"]["median_ms"] if t_entry else None
            rows.append([name, "teacher fwd, all patches", fmt(full, ".3f"), fmt(full, ".3f"), fmt(ms),
                         fmt(None if ms is None else self.throughput(ms), ".0f"), fmt(achieved(full, ms), ".3f"),
                         fmt(t_entry["full"]["peak_extra_mib"] if t_entry else None, ".0f")])
            for keep in args.keeps:
                k = self.num_keep(teacher, keep)
                g = self.gmac(teacher, (spec, k), kind="teacher")
                entry["keeps"][str(keep)] = {"num_keep": k, "gmac": g, "saving": 1 - g / full}
                kt = next((e for e in (t_entry or {}).get("keeps", []) if abs(e["keep"] - keep) < 1e-9), None)
                ms = kt["plugin"]["median_ms"] if kt else None
                rows.append([name, f"teacher fwd, keep {keep:g} ({k} patches)", fmt(g, ".3f"), fmt(g, ".3f"),
                             fmt(ms), fmt(None if ms is None else self.throughput(ms), ".0f"),
                             fmt(achieved(g, ms), ".3f"), fmt(kt["peak_extra_mib"] if kt else None, ".0f")])
            keep = args.distill_keep
            k = self.num_keep(teacher, keep)
            g_keep = self.gmac(teacher, (spec, k), kind="teacher")
            t_paper_gmac = teacher_gflops(set_fused_attn(copy.deepcopy(teacher), False), img_size=self.img,
                                          num_keep=k)
            configs = {"full": s_train + full, "masked": s_train + g_keep, "ceiling": s_train + g_keep,
                       "paper": 3 * s_paper + t_paper_gmac}
            entry["distill_gmac"] = configs
            d = ds.get(spec, {}).get("variants", {})
            for cfg, g in configs.items():
                v = d.get(cfg, {})
                ms = v.get("median_ms")
                rows.append([name, f"distill step: {cfg}" + ("" if cfg == "full" else f" @{keep:g}"), "",
                             fmt(g, ".3f"), fmt(ms), fmt(None if ms is None else self.throughput(ms), ".0f"),
                             fmt(achieved(g, ms), ".3f"), fmt(v.get("peak_extra_mib"), ".0f")])
            out["teachers"].append(entry)
        print_table("4. fvcore cost per image (GMAC = fvcore 'GFLOPs', one multiply-add each) with measured times",
                    ["model", "configuration", "fwd GMAC", "total GMAC", "ms", "img/s", "TFLOP/s (2xMAC)",
                     "peak MiB"], rows)
        mem_note = ("peak MiB = torch.cuda.max_memory_allocated above what was resident before one call"
                    if self.device.type == "cuda" else
                    f"peak memory per configuration: n/a on CPU (process max RSS {maxrss_mib():.0f} MiB)")
        print(f"  train step counted as 3x forward; {mem_note}; fvcore took {time.perf_counter() - t0:.1f} s")
        out["process_max_rss_mib"] = maxrss_mib()
        self.results["cost"] = out

    # --- 5 -----------------------------------------------------------------------------------------------------
    def matmul_ceiling(self) -> Dict[str, float]:
        """Best GEMM throughput in TFLOP/s (2*n^3 FLOP per n x n x n product), per dtype."""
        out = {}
        cuda = self.device.type == "cuda"
        cases = [(8192, torch.bfloat16)] if cuda else [(1024, torch.float32), (512, torch.bfloat16)]
        for n, dtype in cases:
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(n, n, generator=gen).to(self.device, dtype)
            b = torch.randn(n, n, generator=gen).to(self.device, dtype)
            # On CPU F.linear (a @ b.T) and a @ b may take different kernels: keep the faster.
            fns = {"matmul": lambda: a @ b} if cuda else {"matmul": lambda: a @ b, "linear": lambda: F.linear(a, b)}
            iters = max(self.args.iters, 20) if cuda else max(3, self.args.iters // 4)
            stats = interleaved(fns, warmup=2, iters=iters, clock=self.clock)
            best = min(st.median for st in stats.values())
            out[str(dtype).replace("torch.", "")] = 2 * n ** 3 / (best / 1e3) / 1e12
            out[f"{str(dtype).replace('torch.', '')}_n"] = n
            del a, b
        return out

    def section_vitkd(self) -> None:
        _VitkdSection.run(self)

    def section_compiled(self) -> None:
        _CompiledStudentSection.run(self)

    def section_fast(self) -> None:
        args, x = self.args, self.x
        keep = args.distill_keep
        ceilings = self.matmul_ceiling()
        cpu = self.device.type != "cuda"
        specs = args.teachers if args.fast_teachers == "all" else args.teachers[:1]
        if args.fast_teachers not in ("all", "first"):
            specs = [s for s in args.teachers if short_name(s) in args.fast_teachers.split(",")
                     or s in args.fast_teachers.split(",")] or args.teachers[:1]
        student = self.student()
        rows, out = [], {"matmul_ceiling_tflops": ceilings, "teachers": [], "notes": []}
        for spec in specs:
            teacher = self.teacher(spec)
            name = short_name(spec)
            k = self.num_keep(teacher, keep)
            g_keep = self.gmac(teacher, (spec, k), kind="teacher")
            g_full = self.gmac(teacher, (spec, None), kind="teacher")
            common = dict(student=student, keep_ratio=keep, mask_mode="random")
            eager = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, **common)
            t_bf16 = copy.deepcopy(teacher)
            bf16 = MaskedDistillationLoss(nn.CrossEntropyLoss(), t_bf16, "soft", 0.5, 1.0,
                                          teacher_dtype=torch.bfloat16, **common)
            variants: Dict[str, Callable[[], Any]] = {}

            def full_autocast(teacher=teacher):
                with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                    return teacher(x)

            def eager_autocast(eager=eager):
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                    return eager.teacher_logits(x)

            if not cpu:  # the full teacher's share of the GPU's matmul peak (pointless with CPU bf16 emulation)
                variants["full, eager autocast bf16"] = full_autocast
            else:
                variants["keep, eager fp32"] = lambda eager=eager: eager.teacher_logits(x)
            variants["keep, eager autocast bf16"] = eager_autocast
            variants["keep, bf16 weights eager"] = lambda bf16=bf16: bf16.teacher_logits(x)
            compile_info: Dict[str, Any] = {}
            check: Dict[str, Any] = {}
            if args.no_compile:
                compile_info["skipped"] = "--no-compile"
            else:
                comp = MaskedDistillationLoss(nn.CrossEntropyLoss(), t_bf16, "soft", 0.5, 1.0,
                                              teacher_dtype=torch.bfloat16, compile_teacher=True, **common)
                try:
                    t0 = time.perf_counter()
                    comp.teacher_logits(x)
                    if not cpu:
                        torch.cuda.synchronize()
                    compile_info["first_call_s"] = time.perf_counter() - t0
                    # Same random indices (same seed) through eager fp32 and the compiled bf16 path.
                    torch.manual_seed(args.seed)
                    ref = eager.teacher_logits(x).float()
                    idx_ref = eager.last_keep_idx
                    torch.manual_seed(args.seed)
                    got = comp.teacher_logits(x)
                    check = {"same_keep_idx": bool(torch.equal(idx_ref, comp.last_keep_idx)),
                             "max_rel_err_vs_fp32": ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item(),
                             "argmax_agreement": (got.argmax(1) == ref.argmax(1)).float().mean().item()}
                    variants["keep, bf16 + compile"] = lambda comp=comp: comp.teacher_logits(x)
                    if not cpu:
                        comp_ac = MaskedDistillationLoss(nn.CrossEntropyLoss(), t_bf16, "soft", 0.5, 1.0,
                                                         teacher_dtype=torch.bfloat16, compile_teacher=True, **common)

                        def compiled_in_autocast(comp_ac=comp_ac):
                            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                                return comp_ac.teacher_logits(x)

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
                    with torch.autocast(device_type=self.device.type, dtype=amp_dtype):
                        bf16.teacher_logits(x)
                    inside_autocast[amp_name] = "ok"
                except Exception as exc:  # noqa: BLE001 - a finding to report, not a reason to stop
                    inside_autocast[amp_name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            stats = self._time(variants, f"fast teacher {name}")
            peak = {n: peak_extra_mib(fn, self.device) for n, fn in variants.items()}
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
                rows.append([name, vname, fmt(stat.median), fmt(self.throughput(stat.median), ".0f"),
                             fmt(ratio, ".3f"), fmt(tflops, ".3f"), f"{100 * frac:.1f}%",
                             fmt(tflops / 2, ".3f"), fmt(peak[vname], ".0f")])
                entry["variants"][vname] = {**stat.as_dict(), "images_per_s": self.throughput(stat.median),
                                            "ratio_vs_eager_autocast_paired": ratio, "tflops_2xmac": tflops,
                                            "fraction_of_matmul_ceiling": frac, "ceiling_dtype": ceiling_dtype,
                                            "tmacs": tflops / 2,
                                            "peak_extra_mib": peak[vname]}
            out["teachers"].append(entry)
            bf16.remove_hooks()
            del t_bf16, bf16, variants
            gc.collect()
        print_table(f"5. Fast teacher path at keep {keep:g} (teacher_logits, mask_mode='random')",
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
            note = (f"CPU: capability {torch.backends.cpu.get_cpu_capability()}; without native bf16 matmul "
                    "(AVX512-BF16/AMX) bf16 runs slower than fp32 here, so these ratios say nothing about the GPU "
                    "fast path; the section checks that it runs and compiles")
            out["notes"].append(note)
            print("  " + note)
        self.results["fast_teacher"] = out


# --- entry point ---------------------------------------------------------------------------------------------
class _VitkdSection:
    """Section 6, kept apart from the sections above: logit KD vs logit KD + ViTKD, full and masked teacher."""

    @staticmethod
    def run(bench: "Bench") -> None:
        args, x, y = bench.args, bench.x, bench.y
        keep, spec = args.distill_keep, args.teachers[0]
        teacher = bench.teacher(spec)
        variants, crits, labels, heads = {}, {}, {}, {}
        try:
            for feature_kd in (None, "vitkd"):
                for k in (1.0, keep):
                    student = bench.student()
                    name = f"{feature_kd or 'logit'}@{k:g}"
                    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student,
                                                  keep_ratio=k, mask_mode="attention", feature_kd=feature_kd)
                    opt = bench.optimizer(student)
                    for group in crit.feature_param_groups(0.05):  # what main_maskedkd.py does
                        opt.add_param_group(group)
                    crits[name] = crit
                    variants[name] = bench._train_step(student, opt, lambda out, crit=crit: crit(x, out, y))
                    labels[name] = (("logit KD + ViTKD" if feature_kd else "logit KD")
                                    + (", full teacher" if k == 1.0 else f", MaskedKD keep {k:g}"))
                    if feature_kd:
                        heads[name] = heads_gflops(crit.feature_kd, num_kept=crit.num_keep if crit.masking else None)
            stats = bench._time(variants, f"vitkd {short_name(spec)}")
            peak = {n: peak_extra_mib(fn, bench.device) for n, fn in variants.items()}
        finally:
            for crit in crits.values():
                crit.remove_hooks()
        base = stats["logit@1"]
        rows, out = [], {"teacher": spec, "keep": keep, "variants": {}}
        for name, stat in stats.items():
            rows.append([labels[name], fmt(stat.median), fmt(bench.throughput(stat.median), ".0f"),
                         fmt(paired_ratio(stat, base), ".3f"), fmt(heads.get(name), ".3f"), fmt(peak[name], ".0f")])
            out["variants"][name] = {**stat.as_dict(), "label": labels[name], "vs_logit_full": paired_ratio(stat, base),
                                     "heads_gmac_per_img": heads.get(name), "peak_extra_mib": peak[name]}
        km = f"{keep:g}"
        out["vitkd_overhead_full"] = paired_ratio(stats["vitkd@1"], stats["logit@1"])
        out["vitkd_overhead_masked"] = paired_ratio(stats[f"vitkd@{km}"], stats[f"logit@{km}"])
        out["masked_saving_logit"] = 1 - paired_ratio(stats[f"logit@{km}"], stats["logit@1"])
        out["masked_saving_vitkd"] = 1 - paired_ratio(stats[f"vitkd@{km}"], stats["vitkd@1"])
        out["student_gmac_fwd"] = bench.gmac(bench.student(), ("student", None), kind="student")
        print_table(f"6. Logit KD vs logit KD + ViTKD (student {short_name(args.student)}, teacher {short_name(spec)})",
                    ["variant", "ms", "img/s", "vs logit full", "heads GMAC/img", "peak MiB"], rows, left=1)
        print(f"  ViTKD step overhead: x{out['vitkd_overhead_full']:.3f} with the full teacher, "
              f"x{out['vitkd_overhead_masked']:.3f} at keep {km}; MaskedKD saves "
              f"{100 * out['masked_saving_logit']:.1f}% of the logit-KD step and "
              f"{100 * out['masked_saving_vitkd']:.1f}% "
              f"of the ViTKD step (student forward {out['student_gmac_fwd']:.3f} GMAC/img)")
        bench.results["vitkd_step"] = out


class _CompiledStudentSection:
    """Section 7: what torch.compile does to the student step, with and without the attention capture."""

    @staticmethod
    def run(bench: "Bench") -> None:
        args, x, y, batch = bench.args, bench.x, bench.y, bench.args.batch_size
        if args.no_compile:
            print("  skipped (--no-compile)")
            bench.results["compiled_student_step"] = {"skipped": "--no-compile"}
            return
        models = {name: bench.student() for name in ("eager", "eager+capture", "compiled", "compiled+capture")}
        for name in ("compiled", "compiled+capture"):
            models[name] = torch.compile(models[name], backend=args.compile_backend)
        # Built before any compiled call, as a training script builds its loss before the first step.
        captures = {name: AttentionCapture(models[name]) for name in ("eager+capture", "compiled+capture")}
        variants, first_call_s = {}, {}
        try:
            # Same weights before any step: the compiled student must hand over the eager student's scores.
            with bench.amp():
                for name in ("eager+capture", "compiled+capture"):
                    t0 = time.perf_counter()
                    models[name](x)
                    if name.startswith("compiled"):
                        first_call_s[name] = time.perf_counter() - t0
            got, want = captures["compiled+capture"].take(batch), captures["eager+capture"].take(batch)
            err = (got - want).abs().max().item()
            if err > 1e-4 or not torch.equal(topk_indices(got, got.shape[1] // 2).sort(1).values,
                                             topk_indices(want, want.shape[1] // 2).sort(1).values):
                raise RuntimeError(f"compiled student's scores differ from the eager student's (max abs {err:.3g})")
            for name, model in models.items():
                capture = captures.get(name)

                def loss_fn(out, capture=capture):
                    if capture is not None:
                        capture.take(batch)  # what the loss does with the scores
                    return F.cross_entropy(out, y)

                variants[name] = bench._train_step(model, bench.optimizer(model), loss_fn)
            for name in ("compiled", "compiled+capture"):  # the first backward compiles too: keep it out of timing
                t0 = time.perf_counter()
                variants[name]()
                first_call_s[name] = first_call_s.get(name, 0.0) + time.perf_counter() - t0
            stats = bench._time(variants, f"compiled student {args.compile_backend}")
            peak = {n: peak_extra_mib(fn, bench.device) for n, fn in variants.items()}
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
            rows.append([name, fmt(stat.median), fmt(bench.throughput(stat.median), ".0f"), fmt(vs_eager, ".3f"),
                         f"{vs_pair:.3f} vs {pairs[name]}", fmt(first_call_s.get(name), ".1f"),
                         fmt(peak[name], ".0f")])
            out["variants"][name] = {**stat.as_dict(), "vs_eager_paired": vs_eager, "vs_pair_paired": vs_pair,
                                     "pair": pairs[name], "images_per_s": bench.throughput(stat.median),
                                     "peak_extra_mib": peak[name]}
        out["capture_overhead_eager"] = paired_ratio(stats["eager+capture"], stats["eager"])
        out["capture_overhead_compiled"] = paired_ratio(stats["compiled+capture"], stats["compiled"])
        print_table(f"7. Student train step, eager vs torch.compile(backend={args.compile_backend!r}), "
                    f"{short_name(args.student)}", ["variant", "ms", "img/s", "vs eager", "vs its pair",
                                                     "first call s", "peak MiB"], rows, left=1)
        print(f"  capture overhead: x{out['capture_overhead_eager']:.3f} eager, "
              f"x{out['capture_overhead_compiled']:.3f} compiled; compiled scores vs eager: max abs diff {err:.2g}, "
              "same top-k; 'first call s' = compile (forward, then the first step's backward)")
        bench.results["compiled_student_step"] = out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("cpu", "gpu"), default=None,
                   help="model sizes: 'gpu' real (batch 256, 224 px, bf16), 'cpu' small; default from the device")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--section", default="all",
                   help=f"comma list of {','.join(SECTIONS)} or 1-{len(SECTIONS)}, or 'all'")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=20, help="timed repetitions (medians; use >= 20 for reported figures)")
    p.add_argument("--keeps", default="1.0,0.75,0.5,0.25")
    p.add_argument("--distill-keep", type=float, default=0.5, help="keep ratio for sections 3, 5 and 6")
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
        args.sections = list(SECTIONS)
    else:
        wanted = []
        for part in args.section.split(","):
            part = part.strip()
            name = SECTIONS[int(part) - 1] if part.isdigit() else part
            if name not in SECTIONS:
                raise SystemExit(f"unknown section {part!r}: choose from {SECTIONS} or 1-{len(SECTIONS)}")
            wanted.append(name)
        args.sections = [s for s in SECTIONS if s in wanted]  # the cost table reads the timings before it
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    meta = {
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
    print("=" * 100)
    print(f"MaskedKD supervision benchmark   {meta['date']}")
    print(f"  command : {meta['command']}")
    print(f"  device  : {meta['device']}   mode: {args.mode}   torch {torch.__version__}   timm {timm.__version__}")
    print(f"  batch {args.batch_size}, {args.img_size} px, {args.num_classes} classes, autocast {args.amp}, "
          f"warm-up {args.warmup}, median of {args.iters} interleaved repetitions ({meta['timer']})")
    print(f"  student : {short_name(args.student)}; teachers: {', '.join(short_name(t) for t in args.teachers)}")
    if meta["loadavg_start"] is not None:
        print(f"  load average at start: {', '.join(f'{v:.2f}' for v in meta['loadavg_start'])} "
              f"({os.cpu_count()} CPUs)")
    if args.iters < 20:
        print(f"  NOTE: --iters {args.iters} < 20: a smoke run, not figures to report")
    print("=" * 100, flush=True)

    bench = Bench(args)
    t_start = time.perf_counter()
    errors = {}
    for name in args.sections:
        t0 = time.perf_counter()
        print(f"\n-- section {SECTIONS.index(name) + 1}: {name}", flush=True)
        try:
            getattr(bench, f"section_{name}")()
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
            json.dump({"meta": meta, "results": bench.results}, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
