"""The training recipe the demo and the reproduction share, as ``main_maskedkd.py`` command lines.

A *setup* is a dict of the data, schedule and model choices (``CPU_SETUP``; the reproduction's presets are setups
with their epoch counts); an *arm* (``ARMS``) is how the student is supervised: no teacher, the full teacher, or
MaskedKD with a mask criterion and keep ratio, plus any extra flags. ``arm_argv`` turns the two into the exact
flags a run is started with, so ``python main_maskedkd.py <those flags>`` repeats it. Changing a flag here changes
both the demo and the reproduction; keep in mind that the reproduction's finished runs record their setup (not
their flags), so a change of meaning belongs in a setup key (see ``reproduce.ADDED_PARAMS``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

from . import shipped_teacher


class Arm(NamedTuple):
    """How one student is supervised: ``--distillation-type``, ``--mask-mode``, ``--keep-ratio`` and extra flags."""
    kind: str
    mask_mode: str
    keep: float
    extra: Tuple[str, ...] = ()


# name -> arm; 'teacher' is analysis only: it costs a full teacher pass. The keep warm-up anneals 1.0 -> 0.5 over
# the first third of training (--keep-schedule).
ARMS: Dict[str, Arm] = {
    "no KD": Arm("none", "none", 1.0),
    "full-teacher KD": Arm("soft", "none", 1.0),
    "MaskedKD attention, keep 0.5": Arm("soft", "attention", 0.5),
    "MaskedKD attention, keep 0.25": Arm("soft", "attention", 0.25),
    "random mask, keep 0.5": Arm("soft", "random", 0.5),
    "random mask, keep 0.25": Arm("soft", "random", 0.25),
    "teacher-attention mask, keep 0.5 (analysis)": Arm("soft", "teacher", 0.5),
    "MaskedKD 0.5 with keep warm-up from 1.0": Arm("soft", "attention", 0.5, ("--keep-schedule", "linear")),
    "ViTKD + full KD": Arm("soft", "none", 1.0, ("--feature-kd", "vitkd")),
    "ViTKD + MaskedKD 0.5": Arm("soft", "attention", 0.5, ("--feature-kd", "vitkd")),
    # Analysis: does a softer full-teacher target alone (tau 4) do what the masked teacher's softer target does?
    "full-teacher KD, tau 4 (analysis)": Arm("soft", "none", 1.0, ("--distillation-tau", "4")),
    # The fix measured on real images (results/digits/real_images.md): half the kept patches by attention, half
    # at random.
    "MaskedKD mixed (half attention, half random), keep 0.5": Arm("soft", "mixed", 0.5),
    "MaskedKD mixed (half attention, half random), keep 0.25": Arm("soft", "mixed", 0.25),
}

# 2-core CPU: 32 px procedural images, 8x8 patch grid, the shipped teacher (its architecture is in its JSON record),
# a small ViT student; one thread per run, data made in-process. No mixup/erasing/smoothing (small objects, short
# runs) and a cosine schedule without warm-up (a warm-up epoch is a large share of a short run). The demo runs it
# for a few epochs; the reproduction's cpu preset adds its epochs and wrong labels.
CPU_SETUP: Dict = {"img": 32, "patch": 4, "train": 5000, "val": 1000, "batch": 64, "workers": 0, "lr": 1e-3,
                   "warmup": 0, "tau": 1.0, "label_noise": 0.0, "teacher": "shipped",
                   "student": ["deit_tiny_patch16_224", "embed_dim=64", "depth=3", "num_heads=2"]}


def data_argv(p: Dict) -> List[str]:
    """The data set flags of a setup: the built-in procedural objects at ``img`` px, or a bundled data set
    (``data_set``, e.g. DIGITS) with its own flags (``data_flags``)."""
    data_set = p.get("data_set", "PROCEDURAL")
    sizes = ["--input-size", str(p["img"]), "--batch-size", str(p["batch"])]
    if data_set != "PROCEDURAL":
        return ["--data-set", data_set, *p.get("data_flags", []), *sizes, "--num_workers", str(p["workers"])]
    return ["--data-set", "PROCEDURAL", *sizes, "--procedural-train-size", str(p["train"]),
            "--procedural-val-size", str(p["val"]), "--num_workers", str(p["workers"])]


def common_argv(p: Dict, device: str) -> List[str]:
    """Data, schedule and regularisation flags every run of a setup shares (student and teacher alike)."""
    noise = (["--procedural-label-noise", str(p.get("label_noise", 0.0))]
             if p.get("data_set", "PROCEDURAL") == "PROCEDURAL" else [])
    return data_argv(p) + [
        "--device", device, "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--smoothing", "0", "--drop-path", "0",
        "--no-model-ema", "--no-repeated-aug", "--unscale-lr", "--lr", str(p.get("lr", 1e-3)),
        "--warmup-epochs", str(p.get("warmup", 0)), "--cooldown-epochs", "0", "--print-freq", "50"] + noise


def setup_stats(p: Dict):
    """(mean, std) the setup's data pipeline normalises with: its data set's own, or ImageNet's (procedural)."""
    from types import SimpleNamespace
    from .data import data_stats
    return data_stats(SimpleNamespace(data_set=p.get("data_set", "PROCEDURAL"), input_size=p["img"]))


def model_argv(spec: List[str], patch: int, *, teacher: bool = False) -> List[str]:
    """``--model NAME --model-kwargs patch_size=P k=v ...`` (or the teacher's flags) from ``[NAME, "k=v", ...]``."""
    name_flag, kwargs_flag = ("--teacher-model", "--teacher-kwargs") if teacher else ("--model", "--model-kwargs")
    return [name_flag, spec[0], kwargs_flag, f"patch_size={patch}", *spec[1:]]


def teacher_flags(p: Dict, teacher_path: Path) -> List[str]:
    """The flags that build and load a setup's teacher from ``teacher_path``, with its input statistics."""
    if p["teacher"] == "shipped":
        return shipped_teacher.teacher_flags(shipped_teacher.read_meta(teacher_path.with_suffix(".json")),
                                             weights=teacher_path)
    # Trained here on the data pipeline's statistics: say so, or the loss would trust timm's pretrained_cfg for the
    # architecture (0.5/0.5 for vit_*) and re-normalise the teacher's input.
    mean, std = setup_stats(p)
    return model_argv(p["teacher"], p["patch"], teacher=True) + [
        "--teacher-path", str(teacher_path), "--teacher-mean", *map(str, mean), "--teacher-std", *map(str, std)]


def arm_argv(arm: str, *, p: Dict, seed: int, device: str, out: Path, teacher_path: Path,
             mask_vis: Optional[Path] = None) -> List[str]:
    """The command line that trains the setup ``p``'s student under ``arm`` into ``out``."""
    kind, mode, keep, extra = ARMS[arm]
    argv = common_argv(p, device) + model_argv(p["student"], p["patch"]) + [
        "--epochs", str(p["student_epochs"]), "--seed", str(seed), "--output_dir", str(out)]
    if kind != "none":
        argv += teacher_flags(p, teacher_path) + [
            "--distillation-type", kind, "--distillation-alpha", "0.5", "--distillation-tau", str(p.get("tau", 1.0)),
            "--kd-reduction", "batchmean", "--mask-mode", mode, "--keep-ratio", str(keep)] + list(extra)
    if mask_vis is not None:
        argv += ["--mask-vis", str(mask_vis)]
    return argv


def teacher_argv(p: Dict, *, device: str, root: Path) -> List[str]:
    """Training flags for a setup's own teacher: clean labels whatever the student's ``label_noise``.

    The experiment is a teacher that knows what the images show distilled into a student whose labels do not.
    """
    return common_argv({**p, "label_noise": 0.0}, device) + model_argv(p["teacher"], p["patch"]) + [
        "--epochs", str(p["teacher_epochs"]), "--seed", "0", "--output_dir", str(root / "teacher")]
