"""Expected wall time of the GPU session's items on an H100, from fvcore FLOP counts (bench/gmac_gpu.json).

Floor: each timed call's count (GMAC/img x 2 x batch) at 400 TFLOP/s dense bf16. Expected: the floor scaled by
ANCHORS.md's measured H100 times; compile time has no FLOP count and is a stated guess.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

from deit_patch.masking import resolve_num_keep
from deit_patch.quality import FidelityProbe

from .context import BenchContext
from .models import parse_spec

RATE_BF16 = 400e12   # FLOP/s (2 x MAC): realistic dense bf16 matmul rate of an H100 on large matrices
RATE_FP32 = 50e12    # FLOP/s: fp32-ish (the fast part's two fp32 reference calls per teacher)
# H100 measurements (ANCHORS.md: batch 256, 224 px, bf16 autocast) that turn the FLOP floor into an expectation.
ANCHOR_MS = {"student_step": 50.1, "deit_base_patch16_224": 29.6, "deit3_large_patch16_224": 92.6,
             "deit3_huge_patch14_224": 232.5}
PAPER_STUDENT = 78.4 / 50.1     # explicit softmax attention in every block, student step
PAPER_TEACHER = 24.7 / 16.5     # deit_base at keep 0.5, explicit vs fused attention
BF16_WEIGHTS = 0.95             # bf16 weights vs autocast, eager (no anchor: casts saved, a guess)
COMPILED = 96.7 / 119.6         # deit3_huge at keep 0.5, bf16 weights + compile vs eager autocast
DEFAULT_EFFICIENCY = 0.7        # achieved / 400 TFLOP/s for a teacher without an anchor (EVA-02: rotary ops)
COMPILE_S = (15.0, 1.0)         # one torch.compile of a teacher: s + s per block (a guess; none measured here)
PROBE_IMAGES = 8                # the probe's default probe_images
SMALL_BATCH = 4.0               # the probe's passes on 8 images reach this much less of the GPU (a guess)
STARTUP_S = 20.0                # interpreter, imports, CUDA context, the student


class Estimate:
    """Per-item time of each part on an H100: FLOP floor at 400 TFLOP/s, and expected (calibrated on ANCHORS.md)."""

    def __init__(self, table: Dict[str, Any], args: argparse.Namespace):
        self.counts, self.models, self.args = table["counts"], table.get("models", {}), args
        self.reps = args.warmup + args.iters
        # The anchored student step (deit_small, fwd + bwd + AdamW) sets how far a train step falls short of 400.
        anchor_student = BenchContext.gmac_key("deit_small_patch16_224", None, img_size=224, kind="student")
        self.student_efficiency = (3 * self._ms(self.counts[anchor_student]) / ANCHOR_MS["student_step"]
                                   if anchor_student in self.counts else DEFAULT_EFFICIENCY)

    def _gmac(self, spec: str, num_keep: Optional[int], kind: str = "teacher") -> float:
        key = BenchContext.gmac_key(spec, num_keep, img_size=self.args.img_size, kind=kind)
        if key in self.counts:
            return self.counts[key]
        # A keep count the table lacks (a teacher the plugin did not mask when it was written): tokens scale it.
        info = self.models[spec]
        full = self.counts[BenchContext.gmac_key(spec, None, img_size=self.args.img_size, kind=kind)]
        prefix = info["num_prefix_tokens"]
        return full * (prefix + num_keep) / (prefix + info["num_patches"])

    def _ms(self, gmac: float) -> float:
        return 2 * gmac * 1e9 * self.args.batch_size / RATE_BF16 * 1e3

    def teacher_ms(self, spec: str, keep: float, *, floor: bool) -> float:
        info = self.models[spec]
        k = resolve_num_keep(num_patches=info["num_patches"], keep_ratio=keep, num_keep=None)
        ms = self._ms(self._gmac(spec, None if keep == 1.0 else k))
        if floor:
            return ms
        anchor = ANCHOR_MS.get(parse_spec(spec)[0])
        efficiency = self._ms(self._gmac(spec, None)) / anchor if anchor else DEFAULT_EFFICIENCY
        return ms / efficiency

    def student_ms(self, *, floor: bool) -> float:
        ms = 3 * self._ms(self._gmac(self.args.student, None, kind="student"))  # fwd + bwd = 3x fwd
        return ms if floor else ms / self.student_efficiency

    def item_s(self, part: str, spec: str, *, floor: bool = False) -> float:
        """Seconds for one item: timed repetitions, the extra calls (checks, peak memory), compiles."""
        reps, S = self.reps, self.student_ms(floor=floor)
        T = {k: self.teacher_ms(spec, k, floor=floor) for k in (1.0, 0.75, 0.5, 0.25)} if spec in self.models \
            else {}
        if part == "capture":
            per_rep = S * (2 + (1 if floor else PAPER_STUDENT))
            return (reps + 1) * per_rep / 1e3
        if part == "teacher":
            per_rep = T[1.0] + 2 * sum(T.values())
            return (reps + 2) * per_rep / 1e3  # + correctness calls and one peak-memory call per variant
        if part == "distill":
            per_rep = (S + T[1.0]) + 2 * (S + T[0.5])
            return ((reps + 1) * per_rep + S + T[0.5]) / 1e3
        if part == "paper":
            paper = S * (1 if floor else PAPER_STUDENT) + T[0.5] * (1 if floor else PAPER_TEACHER)
            return (reps + 1) * (S + T[0.5] + paper) / 1e3
        if part == "probe":
            # off / default interval / every step, each a masked KD step; the every-step variant adds the full
            # teacher and a random mask on a few images; + the peak and sync calls (2 steps per variant) and one
            # probe interval of teacher calls for the token count.
            info = self.models[spec]
            images = min(PROBE_IMAGES, self.args.batch_size)
            small = images / self.args.batch_size * (1 if floor else SMALL_BATCH)
            per_rep = 3 * (S + T[0.5]) + small * (T[1.0] + T[0.5])
            kept = resolve_num_keep(num_patches=info["num_patches"], keep_ratio=0.5, num_keep=None)
            every = FidelityProbe().interval(batch=self.args.batch_size, patches=info["num_patches"], kept=kept,
                                             prefix=info["num_prefix_tokens"])
            return ((reps + 2) * per_rep + every * T[0.5]) / 1e3
        if part == "fast":
            per_rep = T[1.0] + T[0.5] * (1 + (1 if floor else BF16_WEIGHTS) + 2 * (1 if floor else COMPILED))
            compiles = 0.0 if floor else 2 * (COMPILE_S[0] + COMPILE_S[1] * self.models[spec]["depth"])
            # + 3 bf16 calls (checks, the bf16 teacher inside fp16/bf16 autocast) and 2 fp32 ones (token count, check)
            fp32 = 2 * self.teacher_ms(spec, 0.5, floor=True) * RATE_BF16 / RATE_FP32
            return ((reps + 1) * per_rep + 3 * T[0.5] + fp32) / 1e3 + compiles
        raise KeyError(part)
