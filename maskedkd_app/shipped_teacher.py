"""The ViT teacher that ships with the project, trained on the built-in procedural data set.

``maskedkd_app/assets/procedural_vit_teacher.safetensors`` holds the weights; the JSON beside it records the
architecture, the input statistics it was trained with, the data seed and sizes, the exact training command, its
validation accuracy and the weights' sha256, which ``verify`` checks before anything uses the file. The procedural
data are a pure function of their seed, so the shipped teacher and the data it is used on always agree.

    python -m maskedkd_app.shipped_teacher --retrain     # rerun the recorded command and re-export
    python -m maskedkd_app.shipped_teacher --check       # checksum + accuracy on the val split
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from deit_patch.argtypes import OneLineParser, positive_int

from .args import parse_args
from .checkpoint import CheckpointError, extract_state_dict, read_checkpoint
from .train import main as train_main

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS = ASSETS / "procedural_vit_teacher.safetensors"
META = ASSETS / "procedural_vit_teacher.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(meta: Path = META) -> Dict:
    if not meta.exists():
        raise CheckpointError(f"{meta} is missing: the shipped teacher's record. Restore it from git "
                              "(git checkout maskedkd_app/assets) or retrain: python -m maskedkd_app.shipped_teacher "
                              "--retrain")
    return json.loads(meta.read_text())


def verify(weights: Path = WEIGHTS, meta: Path = META) -> Dict:
    """The teacher's record, after checking that the weights file exists and matches its recorded sha256."""
    info = read_meta(meta)
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing. Restore it from git (git checkout maskedkd_app/assets) or "
                              "retrain: python -m maskedkd_app.shipped_teacher --retrain")
    actual = sha256(weights)
    if actual != info["sha256"]:
        raise CheckpointError(f"{weights} has sha256 {actual}, but {meta.name} records {info['sha256']}: the file "
                              "is corrupt or from another training run. Restore both from git, or retrain: "
                              "python -m maskedkd_app.shipped_teacher --retrain")
    return info


def teacher_flags(info: Dict, weights: Path = WEIGHTS) -> List[str]:
    """main_maskedkd.py flags that build and load this teacher, with the statistics it was trained on.

    The input statistics are passed explicitly: timm's pretrained_cfg of ``vit_small_patch16_224`` says 0.5/0.5
    (its augreg weights), which would make the loss re-normalise the batch for a teacher trained on ImageNet's.
    """
    kwargs = [f"{k}={v}" for k, v in info["model_kwargs"].items()]
    return ["--teacher-model", info["model"], "--teacher-kwargs", *kwargs, "--teacher-path", str(weights),
            "--teacher-mean", *map(str, info["mean"]), "--teacher-std", *map(str, info["std"])]


def build(info: Dict, weights: Optional[Path] = WEIGHTS) -> torch.nn.Module:
    import timm
    model = timm.create_model(info["model"], pretrained=False, num_classes=info["num_classes"],
                              img_size=info["img_size"], **info["model_kwargs"])
    if weights is not None:
        from .checkpoint import load_state_checked
        load_state_checked(model, read_checkpoint(str(weights)), strict=True, source=str(weights),
                           what="shipped teacher", fix="Retrain it: python -m maskedkd_app.shipped_teacher --retrain")
    return model.eval()


def load(weights: Path = WEIGHTS, meta: Path = META) -> torch.nn.Module:
    """The shipped teacher in eval mode, checksum verified."""
    return build(verify(weights, meta), weights)


def val_dataset(info: Dict, num_samples: Optional[int] = None):
    from .data import ProceduralObjects
    data = info["data"]
    return ProceduralObjects(num_samples or data["val_size"], num_classes=info["num_classes"],
                             img_size=info["img_size"], seed=data["procedural_seed"], split="val",
                             mean=info["mean"], std=info["std"])


@torch.no_grad()
def accuracy(model: torch.nn.Module, info: Dict, num_samples: int, batch_size: int = 250) -> float:
    """Top-1 (%) on the first ``num_samples`` images of the val split the teacher was evaluated on."""
    data = val_dataset(info, num_samples)
    correct = 0
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        x = torch.stack([img for img, _ in items])
        y = torch.tensor([label for _, label in items])
        correct += int((model(x).argmax(-1) == y).sum())
    return 100.0 * correct / len(data)


def export(checkpoint: Path, *, argv: List[str], acc1: float, seconds: float, weights: Path = WEIGHTS,
           meta: Path = META) -> Dict:
    """Write a trained run's weights as safetensors plus the JSON record (command, data, accuracy, sha256)."""
    from safetensors.torch import save_file
    args = parse_args(argv)
    state = {k: v.contiguous() for k, v in extract_state_dict(read_checkpoint(str(checkpoint))).items()}
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(weights))
    os.chmod(weights, 0o644)  # safetensors writes 0600; the file ships in the repository
    from .data import data_stats
    mean, std = data_stats(args)
    info = {
        "model": args.model, "model_kwargs": {k: _number(v) for k, v in args.model_kwargs.items()},
        "img_size": args.input_size, "num_classes": args.nb_classes or 10, "mean": list(mean), "std": list(std),
        "data": {"data_set": "PROCEDURAL", "procedural_seed": getattr(args, "procedural_seed", 0),
                 "train_size": args.procedural_train_size, "val_size": args.procedural_val_size},
        "val_acc1": acc1, "train_seconds": round(seconds), "torch": torch.__version__,
        "command": "python main_maskedkd.py " + shlex.join(argv), "argv": argv, "sha256": sha256(weights),
    }
    meta.write_text(json.dumps(info, indent=1) + "\n")
    return info


def _number(value):
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


def retrain(output_dir: Path, *, weights: Path = WEIGHTS, meta: Path = META,
            argv: Optional[List[str]] = None) -> Dict:
    """Rerun the recorded training command (output under ``output_dir``) and re-export the teacher."""
    argv = list(argv or read_meta(meta)["argv"])
    at = argv.index("--output_dir") + 1 if "--output_dir" in argv else None
    if at is None:
        argv += ["--output_dir", str(output_dir)]
    else:
        argv[at] = str(output_dir)
    start = time.time()
    stats = train_main(parse_args(argv))
    return export(Path(output_dir) / "checkpoint.pth", argv=argv, acc1=stats["test_acc1"],
                  seconds=time.time() - start, weights=weights, meta=meta)


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineParser(description="The shipped procedural ViT teacher: check or retrain it")
    parser.add_argument("--retrain", action="store_true", help="rerun the recorded command and re-export")
    parser.add_argument("--check", action="store_true", help="verify the checksum and measure val accuracy")
    parser.add_argument("--output-dir", default="output/shipped_teacher", help="training output (with --retrain)")
    parser.add_argument("--val-images", type=positive_int, default=None, help="val images for --check (default: all)")
    args = parser.parse_args(argv)
    try:
        if args.retrain:
            info = retrain(Path(args.output_dir))
            print(f"retrained: val top-1 {info['val_acc1']:.2f}%, sha256 {info['sha256']}")
        info = verify()
        n = args.val_images or info["data"]["val_size"]
        print(f"shipped teacher {WEIGHTS.name}: sha256 ok, recorded val top-1 {info['val_acc1']:.2f}%, "
              f"measured on {n} val images {accuracy(build(info), info, n):.2f}%")
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
