"""A fixed tiny training run through the plugin's public API, recorded so a refactor can prove it changed nothing.

``python tests/plugin/golden_run.py --write`` records ``golden/refactor_run.pt`` (done once, on the code before the
masked-teacher refactor); ``test_refactor_golden.py`` replays the run and compares kept indices exactly and losses to
float rounding. Only the public API is used: the constructor, ``criterion(samples, outputs, labels)``, the step's
kept indices, the timm task's call.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List

import torch
import torch.nn as nn

from tinymodels import NUM_CLASSES, tiny

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "refactor_run.pt")
STEPS = 3
# (name, loss keyword arguments, student name): the masking criteria, a distilled student, hard KD, ViTKD, keep 1
CASES = [
    ("attention", dict(keep_ratio=0.5), "deit_tiny_patch16_224"),
    ("attention_batchmean", dict(keep_ratio=0.25, kd_reduction="batchmean"), "deit_tiny_patch16_224"),
    ("random", dict(keep_ratio=0.5, mask_mode="random"), "deit_tiny_patch16_224"),
    ("teacher", dict(keep_ratio=0.5, mask_mode="teacher"), "deit_tiny_patch16_224"),
    ("distilled_hard", dict(num_keep=8, distillation_type="hard"), "deit_tiny_distilled_patch16_224"),
    ("vitkd", dict(keep_ratio=0.5, feature_kd="vitkd", vitkd_alpha=0.3, vitkd_beta=0.2), "deit_tiny_patch16_224"),
    ("unmasked", dict(keep_ratio=1.0), "deit_tiny_patch16_224"),
]


def _keep_idx(criterion) -> torch.Tensor:
    # The record of the step just taken; before the refactor it was an attribute of the loss.
    record = getattr(criterion, "last_step", None)
    keep = record.keep_idx if record is not None else getattr(criterion, "last_keep_idx", None)
    return torch.empty(0, dtype=torch.long) if keep is None else keep.clone()


def run_loss_case(kwargs: dict, student_name: str) -> Dict[str, List[torch.Tensor]]:
    from losses import MaskedDistillationLoss
    kwargs = dict(kwargs)
    kind = kwargs.pop("distillation_type", "soft")
    student = tiny(student_name, seed=1)
    if hasattr(student, "set_distilled_training"):
        student.set_distilled_training(True)
    teacher = tiny("deit_small_patch16_224", seed=2, depth=3)
    torch.manual_seed(7)
    criterion = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, kind, 0.5, 2.0, student=student,
                                       teacher_mean=(0.485, 0.456, 0.406), teacher_std=(0.229, 0.224, 0.225),
                                       vitkd_generator=torch.Generator().manual_seed(3), **kwargs)
    params = list(student.parameters()) + (list(criterion.feature_heads.parameters())
                                           if criterion.feature_heads is not None else [])
    optimizer = torch.optim.SGD(params, lr=0.05)
    g = torch.Generator().manual_seed(11)
    out: Dict[str, List[torch.Tensor]] = {"loss": [], "keep": []}
    for _ in range(STEPS):
        x = torch.randn(4, 3, 32, 32, generator=g)
        y = torch.randint(0, NUM_CLASSES, (4,), generator=g)
        student.train()
        loss = criterion(x, student(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out["loss"].append(loss.detach().clone())
        out["keep"].append(_keep_idx(criterion))
    return out


def run_task_case() -> Dict[str, List[torch.Tensor]]:
    try:
        from deit_patch.timm_task import MaskedLogitDistillationTask
        MaskedLogitDistillationTask  # noqa: B018 (raises on a timm without timm.task)
    except ImportError:
        return {}
    student, teacher = tiny(seed=1), tiny(seed=2, depth=3)
    task = MaskedLogitDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), temperature=2.0,
                                       keep_ratio=0.5, verbose=False).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(13)
    out: Dict[str, List[torch.Tensor]] = {"loss": [], "keep": []}
    for _ in range(STEPS):
        x = torch.randn(4, 3, 32, 32, generator=g)
        y = torch.randint(0, NUM_CLASSES, (4,), generator=g)
        result = task(x, y)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        out["loss"].append(result["loss"].detach().clone())
        masked = getattr(task, "masked_teacher", None) or getattr(task, "masker", None)
        step = getattr(masked, "last_step", None)
        out["keep"].append((step.keep_idx if step is not None else masked.last_keep_idx).clone())
    return out


def run_all() -> Dict[str, Dict[str, List[torch.Tensor]]]:
    results = {name: run_loss_case(kwargs, student) for name, kwargs, student in CASES}
    task = run_task_case()
    if task:
        results["timm_task"] = task
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record the run to {GOLDEN}")
    if parser.parse_args().write:
        import timm
        torch.save({"timm": timm.__version__, "torch": str(torch.__version__), "results": run_all()}, GOLDEN)
        print("wrote", GOLDEN)
