"""main_maskedkd.py --feature-kd vitkd end to end: per-term log, heads in resume state, not in EMA or exports."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tinymodels import tiny, save_tiny_teacher

from maskedkd_app import train
from maskedkd_app.args import parse_args
from deit_patch.features import ViTKDHeads
from maskedkd_app.checkpoint import CheckpointError, load_training_state, read_checkpoint, save_training_state

STUDENT = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "embed_dim=64",
           "num_heads=2"]
TEACHER = ["--teacher-model", "deit_small_patch16_224", "--teacher-kwargs", "patch_size=8", "depth=2",
           "embed_dim=96", "num_heads=2"]
RUN = ["--data-set", "PROCEDURAL", "--procedural-train-size", "48", "--procedural-val-size", "16",
       "--input-size", "32", "--batch-size", "8", "--epochs", "1", "--num_workers", "0", "--device", "cpu",
       "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--print-freq", "3", "--warmup-epochs", "0",
       "--lr", "2e-3", "--unscale-lr", "--no-aug", "--drop-path", "0", "--no-repeated-aug", "--smoothing", "0",
       "--distillation-type", "soft", "--keep-ratio", "0.5", "--feature-kd", "vitkd",
       # larger than ViTKD's 3e-5/3e-6 so the heads visibly move the loss in a few steps
       "--vitkd-alpha", "1e-2", "--vitkd-beta", "1e-2"]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pth", num_classes=10)


def run(argv):
    return train.main(parse_args(argv))


def log_lines(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


def test_vitkd_run_logs_terms_resumes_heads_and_keeps_them_out_of_student_weights(teacher_ckpt, tmp_path):
    common = RUN + STUDENT + TEACHER + ["--teacher-path", str(teacher_ckpt)]
    two = list(common)
    two[two.index("--epochs") + 1] = "2"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(two + ["--output_dir", str(straight)])
    run(common + ["--output_dir", str(resumed)])  # epoch 0 only
    after_one = read_checkpoint(resumed / "checkpoint.pth")
    run(two + ["--output_dir", str(resumed)])     # auto-resume: epoch 1 must see the trained heads

    logs = log_lines(straight)
    for line in logs:
        parts = line["train_loss_logit"] + line["train_loss_vitkd_mimic"] + line["train_loss_vitkd_gen"]
        assert parts == pytest.approx(line["train_loss"], rel=1e-5)
        assert line["train_loss_vitkd_mimic"] > 0 and line["train_loss_vitkd_gen"] > 0
    assert log_lines(resumed)[1]["train_loss"] == pytest.approx(logs[1]["train_loss"], rel=1e-5)

    state = read_checkpoint(straight / "checkpoint.pth")
    heads = state["feature_heads"]
    assert {"mask_token", "generator.0.weight", "deep_align.weight", "shallow_align.1.bias"} <= set(heads)
    student_keys = set(tiny("deit_tiny_patch16_224", embed_dim=64, num_heads=2).state_dict())
    assert set(state["model"]) == student_keys                     # no head weights in the student
    assert set(state["model_ema"]) == student_keys                 # nor in its EMA
    best = read_checkpoint(straight / "best_checkpoint.pth")
    assert set(best["model"]) == student_keys                      # nor in the exported weights
    # The heads trained (the mask token starts at zero) and the resume continued from epoch 0's heads.
    assert heads["mask_token"].abs().sum() > 0
    assert not torch.equal(after_one["feature_heads"]["generator.0.weight"], heads["generator.0.weight"])
    # Optimizer: the student's groups plus the heads' decay / no-decay groups.
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups[-2:]] == [0.05, 0.0]


def test_training_state_round_trips_heads_and_refuses_missing_ones(tmp_path):
    model = nn.Linear(3, 2)
    heads = ViTKDHeads(student_dim=4, teacher_dim=6, num_shallow=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with torch.no_grad():
        heads.mask_token.normal_()
    save_training_state(tmp_path / "with.pth", model=model, optimizer=opt, lr_scheduler=sched, epoch=0,
                        args=None, feature_heads=heads)
    fresh = ViTKDHeads(student_dim=4, teacher_dim=6, num_shallow=2)
    load_training_state(tmp_path / "with.pth", model=model, feature_heads=fresh)
    for (name, a), b in zip(heads.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    save_training_state(tmp_path / "without.pth", model=model, optimizer=opt, lr_scheduler=sched, epoch=0, args=None)
    with pytest.raises(CheckpointError, match="feature_heads"):
        load_training_state(tmp_path / "without.pth", model=model, feature_heads=fresh)
    with pytest.raises(CheckpointError, match="feature-distillation heads"):
        load_training_state(tmp_path / "with.pth", model=model,
                            feature_heads=ViTKDHeads(student_dim=4, teacher_dim=8, num_shallow=2))
