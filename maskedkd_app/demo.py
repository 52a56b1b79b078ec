"""``main_maskedkd.py --demo``: what masking the teacher buys, measured in one run of a few minutes on a CPU.

The shipped teacher (``maskedkd_app/assets``, a ViT trained on the built-in procedural data set; checksum
verified) distils the same small ViT student three ways with the ordinary training entry point: MaskedKD
(the teacher sees the half of the patches the student attends to), no teacher at all, and the full teacher.
The table printed at the end comes from these runs: student top-1 per arm, the teacher's fvcore GFLOPs per
image, the teacher compute saved and the wall time. Nothing here is special-cased: the printed command lines
are the ordinary flags, and work on a real dataset.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import distributed as dist_utils
from . import preflight, procs, recipes, shipped_teacher
from .args import parse_args
from .runlog import read_log
from .train import main

MAIN = Path(__file__).resolve().parent.parent / "main_maskedkd.py"

# Demo arm (its name in the table) -> the recipe arm it runs (recipes.ARMS, the reproduction's arms of the same
# name); the order is the order they run and print in.
ARMS: Dict[str, str] = {
    "MaskedKD, keep 0.5": "MaskedKD attention, keep 0.5",
    "no teacher": "no KD",
    "full teacher": "full-teacher KD",
}
DEFAULTS = {"train_size": 5000, "val_size": 1000, "epochs": 10, "arms": list(ARMS)}


def demo_setup(cfg: Dict) -> Dict:
    """The recipe setup of a demo: the reproduction's 2-core CPU setup with clean labels and the demo's sizes."""
    return {**recipes.CPU_SETUP, "train": cfg["train_size"], "val": cfg["val_size"], "student_epochs": cfg["epochs"]}


def demo_argv(arm: str, *, out: Path, device: str, seed: int, cfg: Dict,
              teacher_path: Path = shipped_teacher.WEIGHTS) -> List[str]:
    """The command line one demo arm runs (printed, so users can rerun or adapt it)."""
    return recipes.arm_argv(ARMS[arm], p=demo_setup(cfg), seed=seed, device=device, out=out / arm_dir(arm),
                            teacher_path=teacher_path)


def arm_dir(arm: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in arm.lower()).strip("_")


def demo_threads() -> int:
    """Arms run at once (one thread each): the idle cores (``procs.idle_cores``); an explicit OMP_NUM_THREADS wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return procs.idle_cores()


def expected_cost(arm: str) -> float:
    """An arm's step time relative to the no-teacher arm, from its recipe: 1 + the teacher's kept share of patches.

    Only the scheduling order uses it (longest first); measured on 2 CPU cores the arms took 120 s (no teacher),
    150 s (keep 0.5) and 195 s (full teacher), the same order.
    """
    recipe = recipes.ARMS[ARMS[arm]]
    return 1.0 if recipe.kind == "none" else 1.0 + recipe.keep


def teacher_accuracy(info: Dict, num_images: int) -> float:
    """The shipped teacher's top-1 on the demo's val images, measured now (the file's record is not trusted)."""
    return shipped_teacher.accuracy(shipped_teacher.build(info), info, num_images)


def _distils(arm: str) -> bool:
    return recipes.ARMS[ARMS[arm]].kind != "none"


def _finished_before(arm: str, out: Path, epochs: int) -> bool:
    """The arm's run in ``out`` already logged its last epoch (an earlier demo): a rerun only reports it, so the
    seconds it takes now are not the arm's training time."""
    return any(record.get("epoch") == epochs - 1 for record in read_log(out / arm_dir(arm) / "log.txt"))


def _arm_record(arm: str, out: Path, seconds: Optional[float]) -> Dict:
    """An arm's numbers, read from its run's per-epoch log (the last line is the final epoch)."""
    lines = read_log(out / arm_dir(arm) / "log.txt")
    last = lines[-1]
    return {"student_acc1": last["test_acc1"], "student_max_acc1": max(line["test_acc1"] for line in lines),
            "teacher_gflops": last.get("teacher_gflops_per_img", 0.0) if _distils(arm) else 0.0,
            "teacher_gflops_full": last.get("teacher_gflops_full"),
            "teacher_patch_share": last.get("train_teacher_patch_share"), "seconds": seconds}


def run_demo(args, cfg: Optional[Dict] = None) -> Dict:
    """Train every demo arm (``cfg`` overrides ``DEFAULTS``), print their table and return its numbers."""
    import torch
    cfg = {**DEFAULTS, **(cfg or {})}
    out = preflight.check_output_dir(args.output_dir or "output/demo")
    device = args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu"
    # On CPU the arms run as parallel single-threaded processes, one per free core; under torchrun (or on a GPU)
    # in this process, one after another.
    parallel = device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) == 1
    workers = demo_threads() if parallel else 1
    start = time.time()
    info = shipped_teacher.verify()
    print(f"[demo] shipped teacher {shipped_teacher.WEIGHTS.name}: sha256 ok "
          f"(retrain: python -m maskedkd_app.shipped_teacher --retrain)")
    commands = {arm: demo_argv(arm, out=out, device=device, seed=args.seed, cfg=cfg) for arm in cfg["arms"]}
    reused = [arm for arm in commands if _finished_before(arm, out, cfg["epochs"])]
    if reused:
        print(f"[demo] {out} holds an earlier demo: its finished arms ({', '.join(reused)}) are reported from their "
              "logs, not retrained; pass another --output_dir for a fresh demo")
    for arm, argv in commands.items():
        print(f"[demo] {arm}:\n  python main_maskedkd.py " + " ".join(argv))
    if parallel:
        print(f"[demo] {len(commands)} runs, {workers} at a time, one thread each (free cores: {workers})")
        # Longest first, so the short arms fill the other core instead of leaving the longest one alone at the end.
        jobs = [(arm, [sys.executable, str(MAIN), *argv], out / f"{arm_dir(arm)}.out")
                for arm, argv in sorted(commands.items(), key=lambda item: -expected_cost(item[0]))]
        seconds, _ = procs.run_processes(jobs, workers=workers, cwd=MAIN.parent, label="demo")
    else:
        seconds = {}
        for arm, argv in commands.items():
            arm_start = time.time()
            main(parse_args(argv))
            seconds[arm] = time.time() - arm_start
    torch.set_num_threads(max(1, workers))
    summary: Dict = {"teacher_acc1": teacher_accuracy(info, cfg["val_size"]), "workers": workers,
                     "arms": {arm: _arm_record(arm, out, None if arm in reused else seconds[arm])
                              for arm in commands}}
    summary["seconds"] = time.time() - start
    if dist_utils.is_main_process():
        (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
        print(report(summary, cfg))
    return summary


def report(s: Dict, cfg: Dict) -> str:
    """The demo's table: one row per arm, every number from this run."""
    full = next((a["teacher_gflops_full"] for a in s["arms"].values() if a.get("teacher_gflops_full")), None)
    lines = ["", f"MaskedKD demo: {cfg['train_size']} procedural train images x {cfg['epochs']} epochs, top-1 on "
             f"{cfg['val_size']} val images (10 classes, chance 10%); shipped teacher {s['teacher_acc1']:.1f}%",
             "",
             "| student trained with | student top-1 | teacher GFLOPs/img | teacher compute saved | wall time |",
             "|---|---|---|---|---|"]
    for arm, a in s["arms"].items():
        saved = f"{100 * (1 - a['teacher_gflops'] / full):.0f}%" if a["teacher_gflops"] and full else "-"
        gflops = f"{a['teacher_gflops']:.4f}" if a["teacher_gflops"] else "0 (no teacher)"
        wall = f"{a['seconds']:.0f} s" if a["seconds"] is not None else "earlier run"
        lines.append(f"| {arm} | {a['student_acc1']:.1f}% | {gflops} | {saved} | {wall} |")
    lines.append(f"\ntotal {s['seconds']:.0f} s wall, arms run {s['workers']} at a time (one thread each); wall time "
                 "per arm includes waiting for a core on a busy machine")
    return "\n".join(lines)
