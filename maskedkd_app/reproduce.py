"""Reproduce the MaskedKD claim at small scale: ``python -m maskedkd_app.reproduce``.

One teacher is trained with the project's own training code, then a smaller student is distilled under every arm
(no KD, full-teacher KD, student-attention masks, random masks, teacher-attention masks) with the same schedule
and several seeds. Results go to REPRODUCTION.md (table + the command) and a JSON file beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

# name -> (distillation type, mask mode, keep ratio); 'teacher' is analysis only: it costs a full teacher pass.
ARMS: Dict[str, tuple] = {
    "no KD": ("none", "none", 1.0),
    "full-teacher KD": ("soft", "none", 1.0),
    "MaskedKD attention, keep 0.5": ("soft", "attention", 0.5),
    "MaskedKD attention, keep 0.25": ("soft", "attention", 0.25),
    "random mask, keep 0.5": ("soft", "random", 0.5),
    "random mask, keep 0.25": ("soft", "random", 0.25),
    "teacher-attention mask, keep 0.5 (analysis)": ("soft", "teacher", 0.5),
}

PRESETS = {
    # 2-core CPU, under an hour: 32 px, 8x8 patch grid, small ViTs.
    "cpu": {"img": 32, "patch": 4, "train": 4000, "val": 1000, "batch": 64, "teacher_epochs": 20,
            "student_epochs": 8, "workers": 1,
            "teacher": ["vit_small_patch16_224", "embed_dim=96", "depth=4", "num_heads=3"],
            "student": ["deit_tiny_patch16_224", "embed_dim=64", "depth=3", "num_heads=2"]},
    # One GPU: 64 px, 16x16 grid, the DeiT-S/Ti shapes at reduced depth, more data and epochs.
    "gpu": {"img": 64, "patch": 4, "train": 50000, "val": 5000, "batch": 256, "teacher_epochs": 40,
            "student_epochs": 30, "workers": 8,
            "teacher": ["vit_small_patch16_224", "embed_dim=384", "depth=8", "num_heads=6"],
            "student": ["deit_tiny_patch16_224", "embed_dim=192", "depth=6", "num_heads=3"]},
}


def _common(p: Dict, device: str, out: Path) -> List[str]:
    return ["--data-set", "PROCEDURAL", "--input-size", str(p["img"]), "--batch-size", str(p["batch"]),
            "--procedural-train-size", str(p["train"]), "--procedural-val-size", str(p["val"]),
            "--num_workers", str(p["workers"]), "--device", device, "--mixup", "0", "--cutmix", "0", "--reprob", "0",
            "--smoothing", "0", "--drop-path", "0", "--no-model-ema", "--no-repeated-aug", "--unscale-lr",
            "--lr", "1e-3", "--warmup-epochs", "1", "--cooldown-epochs", "0", "--print-freq", "50"]


def _model(spec: List[str], patch: int, *, teacher: bool = False) -> List[str]:
    name_flag, kwargs_flag = ("--teacher-model", "--teacher-kwargs") if teacher else ("--model", "--model-kwargs")
    return [name_flag, spec[0], kwargs_flag, f"patch_size={patch}", *spec[1:]]


def arm_argv(arm: str, *, p: Dict, seed: int, device: str, out: Path, teacher_path: Path,
             mask_vis: Optional[Path]) -> List[str]:
    kind, mode, keep = ARMS[arm]
    argv = _common(p, device, out) + _model(p["student"], p["patch"]) + [
        "--epochs", str(p["student_epochs"]), "--seed", str(seed), "--output_dir", str(out)]
    if kind != "none":
        argv += _model(p["teacher"], p["patch"], teacher=True) + [
            "--teacher-path", str(teacher_path), "--distillation-type", kind, "--distillation-alpha", "0.5",
            "--distillation-tau", "1.0", "--kd-reduction", "batchmean", "--mask-mode", mode, "--keep-ratio", str(keep)]
    if mask_vis is not None:
        argv += ["--mask-vis", str(mask_vis)]
    return argv


def _parse(argv: List[str]):
    import main_maskedkd
    parser = argparse.ArgumentParser(parents=[main_maskedkd.get_args_parser()])
    return parser.parse_args(argv)


def _run(argv: List[str]) -> Dict:
    import main_maskedkd
    return main_maskedkd.main(_parse(argv))


def train_teacher(p: Dict, *, device: str, root: Path) -> Dict:
    target = root / "teacher.pth"
    info = root / "teacher.json"
    if target.exists() and info.exists():
        print(f"[reproduce] using cached teacher {target}")
        return json.loads(info.read_text())
    from .checkpoint import extract_state_dict, read_checkpoint, save_atomic
    argv = _common(p, device, root) + _model(p["teacher"], p["patch"]) + [
        "--epochs", str(p["teacher_epochs"]), "--seed", "0", "--output_dir", str(root / "teacher")]
    start = time.time()
    stats = _run(argv)
    save_atomic({"model": extract_state_dict(read_checkpoint(root / "teacher" / "checkpoint.pth"))}, target)
    result = {"acc1": stats["test_acc1"], "seconds": time.time() - start, "argv": argv}
    info.write_text(json.dumps(result, indent=1))
    return result


def training_gflops(stats: Dict, *, images_per_epoch: int, epochs: int) -> float:
    """Student training (3x forward) + teacher per image, over every image the run processed."""
    student = stats.get("student_gflops_train") or 0.0
    teacher = stats.get("teacher_gflops_per_img") or 0.0
    return (student + teacher) * images_per_epoch * epochs


def run(preset: str, p: Dict, *, seeds: List[int], arms: List[str], device: str, root: Path, mask_vis: bool) -> Dict:
    root.mkdir(parents=True, exist_ok=True)
    teacher = train_teacher(p, device=device, root=root)
    results: Dict[str, List[Dict]] = {}
    done_file = root / "runs.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    for arm in arms:
        for seed in seeds:
            key = f"{arm} | seed {seed}"
            if key in done:  # an interrupted experiment continues where it stopped
                results.setdefault(arm, []).append(done[key])
                continue
            slug = arm.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace(".", "")
            vis = root / "masks" / slug if mask_vis and seed == seeds[0] and ARMS[arm][1] != "none" else None
            start = time.time()
            stats = _run(arm_argv(arm, p=p, seed=seed, device=device, out=root / slug / f"seed{seed}",
                                  teacher_path=root / "teacher.pth", mask_vis=vis))
            if ARMS[arm][0] == "none":  # the student's own FLOPs, counted the same way for the no-KD arm
                stats.update(_student_only_cost(p))
            record = {"acc1": stats["test_acc1"], "max_acc1": stats["max_accuracy"], "seconds": time.time() - start,
                      "teacher_gflops": stats.get("teacher_gflops_per_img", 0.0),
                      "train_gflops": training_gflops(stats, images_per_epoch=p["train"] // p["batch"] * p["batch"],
                                                      epochs=p["student_epochs"])}
            done[key] = record
            done_file.write_text(json.dumps(done, indent=1))
            results.setdefault(arm, []).append(record)
    return {"preset": preset, "params": p, "teacher": teacher, "seeds": seeds, "results": results}


def _student_only_cost(p: Dict) -> Dict:
    import timm
    from deit_patch.cost import student_gflops
    kwargs = dict(x.split("=") for x in p["student"][1:])
    model = timm.create_model(p["student"][0], num_classes=10, img_size=p["img"], patch_size=p["patch"],
                              **{k: int(v) for k, v in kwargs.items()})
    return {"student_gflops_train": 3 * student_gflops(model, img_size=(p["img"], p["img"]))}


def _mean_std(values: List[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_report(summary: Dict, path: Path, command: str) -> str:
    p = summary["params"]
    lines = [
        "# MaskedKD at small scale: reproduction", "",
        f"Command: `{command}`", "",
        f"Preset `{summary['preset']}`: procedural dataset (10 classes of small objects among clutter), "
        f"{p['img']} px, patch {p['patch']} ({(p['img'] // p['patch']) ** 2} patches), {p['train']} train / "
        f"{p['val']} val images, batch {p['batch']}. Teacher `{' '.join(p['teacher'])}` trained {p['teacher_epochs']} "
        f"epochs: top-1 {summary['teacher']['acc1']:.2f}%. Student `{' '.join(p['student'])}`, "
        f"{p['student_epochs']} epochs, soft KD (alpha 0.5, tau 1, batchmean), seeds {summary['seeds']}.", "",
        "| arm | student top-1 (final, mean ± std) | best-epoch top-1 | teacher GFLOPs/img | training GFLOPs (total) | wall time/run (s) |",
        "|---|---|---|---|---|---|",
    ]
    for arm, records in summary["results"].items():
        lines.append(f"| {arm} | {_mean_std([r['acc1'] for r in records])} | "
                     f"{_mean_std([r['max_acc1'] for r in records])} | "
                     f"{statistics.mean(r['teacher_gflops'] for r in records):.4f} | "
                     f"{statistics.mean(r['train_gflops'] for r in records):.1f} | "
                     f"{statistics.mean(r['seconds'] for r in records):.0f} |")
    lines += ["", "Teacher GFLOPs/img are fvcore counts of the pruned forward the arm runs. The teacher-attention arm "
              "adds a full teacher pass to choose its mask, so it costs more than full KD: it is an analysis "
              "reference, not a saving.", ""]
    text = "\n".join(lines)
    path.write_text(text + summary.get("findings", ""))
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default="output/reproduce")
    parser.add_argument("--report", default="REPRODUCTION.md")
    parser.add_argument("--no-mask-vis", action="store_true")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="change a preset value, e.g. train=1000 student_epochs=2 (smoke runs)")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    for item in args.override:
        key, value = item.split("=", 1)
        preset[key] = type(preset[key])(value)
    start = time.time()
    summary = run(args.preset, preset, seeds=args.seeds, arms=args.arms, device=args.device, root=Path(args.output_dir),
                  mask_vis=not args.no_mask_vis)
    summary["total_seconds"] = time.time() - start
    Path(args.output_dir, "summary.json").write_text(json.dumps(summary, indent=1))
    command = "python -m maskedkd_app.reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_report(summary, Path(args.report), command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
