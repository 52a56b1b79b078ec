"""What the benchmark sections share: the settings of each mode, and one context that builds every model once.

Real sizes (ANCHORS.md) and CPU stand-ins with the same three code paths: a ViT/DeiT teacher (class token inside
the position embedding), a DeiT-III one (no_embed_class) and a patch-14-like one whose grid differs from the
student's (teacher patch 7 -> 9x9 against student patch 8 -> 8x8 at 64 px, as 16x16 vs 14x14 at 224 px). The CPU
sizes are chosen for a run of a few minutes on one core, not for realistic ratios. CPU mode runs one thread by
default: with other processes on a 2-core machine, every OpenMP barrier across 2 threads can wait a whole
scheduler slice (we saw 10-15x slow-downs quantised in ~4 ms steps), which wrecks ratios; one thread only slows.
'smoke' is smaller still (48 px, width 32-64, depth 1-2): it checks that every code path runs, in seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from deit_patch.cost import student_gflops, teacher_gflops
from deit_patch.masking import random_indices

from .models import build_model, keep_count, patch_grid, short_name
from .timing import Clock, Stat, interleaved

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
    # The GPU teachers' classes at toy size (student grid 6x6, the patch-14 stand-in's 8x8): what the GPU session's
    # CPU smoke mode runs, so every code path of the real run is exercised in seconds.
    "smoke": dict(batch_size=4, img_size=48, num_classes=10, warmup=1, amp="none", threads=1,
                  student="deit_small_patch16_224:patch_size=8:depth=2:embed_dim=32:num_heads=2",
                  teachers=("deit_base_patch16_224:patch_size=8:depth=2:embed_dim=48:num_heads=2,"
                            "deit3_large_patch16_224:patch_size=8:depth=2:embed_dim=48:num_heads=2,"
                            "deit3_huge_patch14_224:patch_size=6:depth=2:embed_dim=64:num_heads=2"),
                  fast_teachers="first"),
}

TIMING_ITERS_TO_REPORT = 20  # fewer repetitions: a smoke run, not figures to report


def release(loss: nn.Module) -> None:
    """Detach a distillation loss's hooks from its student, where the loss has any."""
    remove = getattr(loss, "remove_hooks", None)
    if callable(remove):
        remove()


class BenchContext:
    """Inputs, models (each built once and shared by the sections), the clock and the step builders."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.clock = Clock(self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
        self.img = (args.img_size, args.img_size)
        self.results: Dict[str, Any] = {}
        self.deadline: Optional[float] = None  # time.perf_counter() value; set by the GPU session per part
        self._teachers: Dict[str, nn.Module] = {}
        self._student: Optional[nn.Module] = None
        self._flops: Dict[Tuple[str, Optional[int]], float] = {}
        self.gmac_table: Dict[str, float] = {}  # precomputed counts (GPU session), keyed by gmac_key()
        self.cache: Dict[str, Any] = {}
        gen = torch.Generator().manual_seed(args.seed)
        self.x = torch.randn(args.batch_size, 3, *self.img, generator=gen).to(self.device)
        self.y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(self.device)

    def amp(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # --- models, built once and shared by the sections --------------------------------------------------------
    def teacher(self, spec: str) -> nn.Module:
        if spec not in self._teachers:
            t0 = time.perf_counter()
            model = build_model(spec, img_size=self.args.img_size, num_classes=self.args.num_classes,
                                device=self.device).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._teachers[spec] = model
            print(f"    [built teacher {short_name(spec)}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
                  f"params, grid {patch_grid(model)}, {time.perf_counter() - t0:.1f} s]", flush=True)
        return self._teachers[spec]

    def drop_teacher(self, spec: str) -> None:
        self._teachers.pop(spec, None)

    def student(self) -> nn.Module:
        """A fresh copy of one randomly initialised student (each variant trains its own copy)."""
        if self._student is None:
            self._student = build_model(self.args.student, img_size=self.args.img_size,
                                        num_classes=self.args.num_classes, device=self.device).train()
        return copy.deepcopy(self._student).train()

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        # A tiny learning rate: random data for many steps must not drive the weights to inf/NaN.
        return torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)

    # --- fvcore counts (GMAC per image), cached ----------------------------------------------------------------
    @staticmethod
    def gmac_key(spec: str, num_keep: Optional[int], *, img_size: int, kind: str) -> str:
        return f"{kind}|{spec}|{img_size}|{'full' if num_keep is None else num_keep}"

    def gmac(self, model: nn.Module, key: Tuple[str, Optional[int]], *, kind: str) -> float:
        if key not in self._flops:
            table_key = self.gmac_key(key[0], key[1], img_size=self.args.img_size, kind=kind)
            if table_key in self.gmac_table:
                self._flops[key] = self.gmac_table[table_key]
            elif kind in ("student", "student_paper"):
                self._flops[key] = student_gflops(model, img_size=self.img)
            else:
                self._flops[key] = teacher_gflops(model, img_size=self.img, num_keep=key[1])
        return self._flops[key]

    # --- keep counts and indices ---------------------------------------------------------------------------------
    def num_keep(self, teacher: nn.Module, keep: float) -> int:
        return keep_count(teacher, keep)

    def random_keep_idx(self, teacher: nn.Module, num_keep: int) -> torch.Tensor:
        rows, cols = patch_grid(teacher)
        gen = torch.Generator().manual_seed(self.args.seed + num_keep)
        return random_indices(self.args.batch_size, rows * cols, num_keep, device=torch.device("cpu"),
                              generator=gen).to(self.device)

    def teacher_tol(self) -> float:
        return 1e-4 if self.amp_dtype is None else 5e-2

    # --- timing ------------------------------------------------------------------------------------------------
    def time(self, variants: Dict[str, Callable[[], Any]], label: str) -> Dict[str, Stat]:
        return interleaved(variants, warmup=self.args.warmup, iters=self.args.iters, clock=self.clock, label=label,
                           deadline=self.deadline)

    def throughput(self, ms: float) -> float:
        return self.args.batch_size / (ms / 1e3)

    def train_step(self, model: nn.Module, opt: torch.optim.Optimizer,
                   loss_fn: Callable[[Any], torch.Tensor]) -> Callable[[], None]:
        """One student training step: forward (under the mode's autocast), loss, backward, optimizer step."""
        x = self.x

        def step():
            with self.amp():
                out = model(x)
                loss = loss_fn(out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline
