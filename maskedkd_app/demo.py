"""``main_maskedkd.py --demo``: a real MaskedKD distillation on the built-in procedural dataset, in minutes on CPU.

Two runs of the ordinary training entry point: a small ViT teacher is trained first (skipped when
``<output_dir>/teacher.pth`` exists), then a smaller ViT student is distilled from it with student-guided
masking at keep 0.5. Nothing here is special-cased: the same flags work on a real dataset.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import distributed as dist_utils
from .checkpoint import extract_state_dict, read_checkpoint, save_atomic

# Shared by both runs: 32 px images of 10 object classes, no mixup/erasing (the objects are small, and the point
# is a fast, readable run), a short cosine schedule.
COMMON = ["--data-set", "PROCEDURAL", "--input-size", "32", "--batch-size", "64", "--num_workers", "0",
          "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--smoothing", "0", "--drop-path", "0",
          "--no-model-ema", "--no-repeated-aug", "--unscale-lr", "--warmup-epochs", "1", "--cooldown-epochs", "0",
          "--min-lr", "1e-5", "--weight-decay", "0.05", "--print-freq", "25"]
TEACHER_SHAPE = ["patch_size=4", "embed_dim=64", "depth=4", "num_heads=2"]  # 8x8 patch grid at 32 px
TEACHER = ["--model", "vit_small_patch16_224", "--model-kwargs", *TEACHER_SHAPE, "--lr", "2e-3"]
STUDENT = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=48", "depth=2",
           "num_heads=2", "--lr", "2e-3"]
TEACHER_KWARGS = ["--teacher-model", "vit_small_patch16_224", "--teacher-kwargs", *TEACHER_SHAPE]
DEFAULTS = {"train_size": 3000, "val_size": 500, "teacher_epochs": 24, "student_epochs": 10, "keep_ratio": 0.5}


def demo_argv(kind: str, *, out: Path, device: str, seed: int, cfg: Dict) -> List[str]:
    """The command line each demo phase runs (printed, so users can rerun or adapt it)."""
    sizes = ["--procedural-train-size", str(cfg["train_size"]), "--procedural-val-size", str(cfg["val_size"]),
             "--device", device, "--seed", str(seed)]
    if kind == "teacher":
        return COMMON + sizes + TEACHER + ["--epochs", str(cfg["teacher_epochs"]), "--output_dir", str(out / "teacher")]
    return COMMON + sizes + STUDENT + TEACHER_KWARGS + [
        "--epochs", str(cfg["student_epochs"]), "--distillation-type", "soft", "--distillation-alpha", "0.5",
        "--distillation-tau", "1.0", "--kd-reduction", "batchmean", "--keep-ratio", str(cfg["keep_ratio"]),
        "--teacher-path", str(out / "teacher.pth"), "--output_dir", str(out / "student")]


def ensure_teacher(*, out: Path, run: Callable[[List[str]], Dict], argv: List[str]) -> Optional[float]:
    """Train the teacher unless ``out/teacher.pth`` is cached; returns its accuracy when it was trained now."""
    target = out / "teacher.pth"
    if target.exists():
        print(f"[demo] using cached teacher {target}")
        return None
    print("[demo] training the teacher:\n  python main_maskedkd.py " + " ".join(argv))
    stats = run(argv)
    if dist_utils.is_main_process():
        weights = extract_state_dict(read_checkpoint(out / "teacher" / "checkpoint.pth"))
        save_atomic({"model": weights, "acc1": stats.get("test_acc1")}, target)
    dist_utils.barrier()
    return stats.get("test_acc1")


def run_demo(args, main_fn: Callable, parse_fn: Callable[[List[str]], object], cfg: Optional[Dict] = None) -> Dict:
    cfg = {**DEFAULTS, **(cfg or {})}
    out = Path(args.output_dir or "output/demo")
    out.mkdir(parents=True, exist_ok=True)
    device = args.device if args.device != "cuda" or _has_cuda() else "cpu"
    start = time.time()
    run = lambda argv: main_fn(parse_fn(argv))
    teacher_acc = ensure_teacher(out=out, run=run, argv=demo_argv("teacher", out=out, device=device,
                                                                   seed=args.seed, cfg=cfg))
    if teacher_acc is None:
        teacher_acc = read_checkpoint(out / "teacher.pth").get("acc1")
    argv = demo_argv("student", out=out, device=device, seed=args.seed, cfg=cfg)
    print("[demo] distilling the student with MaskedKD:\n  python main_maskedkd.py " + " ".join(argv))
    stats = run(argv)
    summary = {"teacher_acc1": teacher_acc, "student_acc1": stats.get("test_acc1"),
               "student_max_acc1": stats.get("max_accuracy"),
               "teacher_gflops_full": stats.get("teacher_gflops_full"),
               "teacher_gflops_masked": stats.get("teacher_gflops_per_img"),
               "teacher_tokens_kept": stats.get("train_teacher_tokens_kept"),
               "seconds": time.time() - start}
    if summary["teacher_gflops_full"]:
        summary["teacher_compute_saved"] = 1 - summary["teacher_gflops_masked"] / summary["teacher_gflops_full"]
    if dist_utils.is_main_process():
        (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
        print(_report(summary))
    return summary


def _report(s: Dict) -> str:
    lines = ["", "=" * 64, "MaskedKD demo finished in {:.0f} s".format(s["seconds"])]
    if s.get("teacher_acc1") is not None:
        lines.append(f"  teacher top-1 (all patches):              {s['teacher_acc1']:.1f}%")
    lines.append(f"  student top-1 after distillation:          {s['student_acc1']:.1f}%")
    if s.get("teacher_compute_saved") is not None:
        lines.append(f"  teacher GFLOPs/img: {s['teacher_gflops_full']:.3f} full -> {s['teacher_gflops_masked']:.3f} "
                     f"masked ({100 * s['teacher_compute_saved']:.0f}% of teacher compute saved)")
    lines.append("=" * 64)
    return "\n".join(lines)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()
