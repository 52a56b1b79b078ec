"""Masked vs full distillation step for the teacher families added with layout.py: EVA-02 (rotary embedding) and
BEiT (relative position bias), with a plain ViT teacher as the reference.

For each teacher: one DeiT training step of a DeiT-Ti student (forward, MaskedDistillationLoss, backward, AdamW)
with the teacher unmasked (keep 1.0, exactly DeiT's loss) and masked (keep 0.5, student-attention mask), plus
the teacher's own no-grad forward full vs pruned, and fvcore GFLOPs of both. Variants run interleaved inside each
repetition (the starting one rotates) so drifting load hits them alike; figures are medians after warm-up.
Teachers have random weights: time and FLOPs do not depend on the values.

  python -m bench.bench_family_teachers                      # CPU: 224 px, batch 8, ~minutes
  python -m bench.bench_family_teachers --iters 20 --json bench_family_teachers.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import warnings
from typing import Callable, List

import timm
import torch
import torch.nn as nn

from deit_patch import layout
from deit_patch.cost import teacher_gflops
from deit_patch.teachers import find_family, pruned_forward
from losses import MaskedDistillationLoss

from .timing import Clock, interleaved, paired_ratio

# name -> (timm model, constructor overrides): real architectures at 224 px; BEiT at ViT-S width (timm only has
# BEiT-B/L, too slow for a CPU step), with its per-block relative position bias as beit_base uses it.
TEACHERS = {
    "vit_small (abs. pos.)": ("vit_small_patch16_224", {}),
    "eva02_tiny (rope)": ("eva02_tiny_patch14_224", {}),
    "beit_small (rel. pos. bias)": ("beit_base_patch16_224", dict(embed_dim=384, num_heads=6)),
}
STATS = dict(teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3, student_mean=(0.5,) * 3, student_std=(0.5,) * 3)


def bench_teacher(label: str, model_name: str, overrides: dict, *, batch: int, iters: int, warmup: int) -> dict:
    torch.manual_seed(0)
    teacher = timm.create_model(model_name, pretrained=False, num_classes=1000, **overrides).eval()
    student = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=1000)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    img = layout.built_image_size(teacher)
    patches = layout.num_patches(teacher)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *img, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    losses = {keep: MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student,
                                           keep_ratio=keep, **STATS) for keep in (1.0, 0.5)}
    num_keep = losses[0.5].num_keep

    def step(keep: float) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = losses[keep](x, student.train()(x), y)
            loss.backward()
            optimizer.step()
        return run

    keep_idx = torch.stack([torch.randperm(patches, generator=g)[:num_keep].sort().values for _ in range(batch)])
    family = find_family(teacher)

    def teacher_forward(kept) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                teacher(x) if kept is None else pruned_forward(teacher, x, kept, family)
        return run

    clock = Clock(torch.device("cpu"))
    steps = interleaved({"full": step(1.0), "masked": step(0.5)}, iters=iters, warmup=warmup, clock=clock)
    forwards = interleaved({"full": teacher_forward(None), "masked": teacher_forward(keep_idx)}, iters=iters,
                           warmup=warmup, clock=clock)
    for loss in losses.values():
        loss.remove_hooks()
    return {
        "teacher": label, "model": model_name, "overrides": {k: str(v) for k, v in overrides.items()},
        "family": family.name, "img": list(img), "patches": patches, "num_keep": num_keep, "batch": batch,
        "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "gflops_full": teacher_gflops(teacher, img_size=img, num_keep=None),
        "gflops_masked": teacher_gflops(teacher, img_size=img, num_keep=num_keep),
        "step_s_full": steps["full"].median / 1e3, "step_s_masked": steps["masked"].median / 1e3,
        "step_speedup_paired": paired_ratio(steps["full"], steps["masked"]),
        "teacher_fwd_s_full": forwards["full"].median / 1e3, "teacher_fwd_s_masked": forwards["masked"].median / 1e3,
    }


def table(rows: List[dict]) -> str:
    head = (f"{'teacher':<28} {'family':<7} {'keep':>8} {'GFLOPs full':>11} {'masked':>7} {'teacher fwd full':>16} "
            f"{'masked':>7} {'step full':>9} {'masked':>7} {'step speed-up':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['teacher']:<28} {r['family']:<7} {r['num_keep']:>3}/{r['patches']:<4} "
                     f"{r['gflops_full']:>11.2f} {r['gflops_masked']:>7.2f} {r['teacher_fwd_s_full']:>15.3f}s "
                     f"{r['teacher_fwd_s_masked']:>6.3f}s {r['step_s_full']:>8.3f}s {r['step_s_masked']:>6.3f}s "
                     f"{r['step_speedup_paired']:>12.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--json", default="bench_family_teachers.json", help="where to write the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    for label, (name, overrides) in TEACHERS.items():
        rows.append(bench_teacher(label, name, overrides, batch=args.batch, iters=args.iters, warmup=args.warmup))
        print(f"[{label} done]", flush=True)
    print(f"CPU, torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, batch "
          f"{args.batch}, median of {args.iters} interleaved; speed-up = median of paired ratios; student "
          "deit_tiny_patch16_224; step = forward + loss + backward + AdamW")
    print(table(rows))
    with open(args.json, "w") as handle:
        json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": "cpu",
                   "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "timm": timm.__version__, "iters": args.iters, "rows": rows},
                  handle, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
