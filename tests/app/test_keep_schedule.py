"""--keep-schedule: the kept patch count per epoch follows the schedule, and the cost summary integrates it."""
import json
import math

import pytest
import torch

from tinymodels import tiny

from maskedkd_app import train
from maskedkd_app.args import parse_args
from maskedkd_app.cli import cli
from deit_patch.masking import scheduled_keep_ratio

TEACHER = ["--teacher-model", "deit_small_patch16_224", "--teacher-kwargs", "patch_size=8", "depth=2",
           "embed_dim=64", "num_heads=2"]
RUN = ["--data-set", "PROCEDURAL", "--procedural-train-size", "64", "--procedural-val-size", "32",
       "--input-size", "32", "--batch-size", "16", "--num_workers", "0", "--device", "cpu", "--mixup", "0",
       "--cutmix", "0", "--reprob", "0", "--no-model-ema", "--warmup-epochs", "0", "--unscale-lr",
       "--model", "deit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "embed_dim=32",
       "num_heads=2", "--distillation-type", "soft", "--print-freq", "100"]


def _run(argv):
    return train.main(parse_args(argv))


def test_schedule_values():
    # linear: 1.0 -> 0.5 over 4 epochs, then 0.5; cosine: half a cosine between the same ends
    lin = [scheduled_keep_ratio(e, target=0.5, warmup_epochs=4, shape="linear") for e in range(6)]
    assert lin == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.5])
    cos = [scheduled_keep_ratio(e, target=0.5, warmup_epochs=4, shape="cosine") for e in range(5)]
    assert cos == pytest.approx([1.0 - 0.5 * 0.5 * (1 - math.cos(math.pi * e / 4)) for e in range(5)])
    assert scheduled_keep_ratio(0, target=0.25, warmup_epochs=0) == 0.25
    with pytest.raises(ValueError, match="unknown keep schedule"):
        scheduled_keep_ratio(0, target=0.5, warmup_epochs=2, shape="step")
    with pytest.raises(ValueError, match="outside"):
        scheduled_keep_ratio(0, target=0.0, warmup_epochs=2)


def test_logged_keep_follows_schedule_and_cost_integrates_it(tmp_path):
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": tiny("vit_small_patch16_224", embed_dim=64, num_heads=2).state_dict()}, teacher)
    out = tmp_path / "run"
    _run(RUN + TEACHER + ["--teacher-path", str(teacher), "--keep-ratio", "0.25", "--epochs", "4",
                          "--keep-schedule", "linear", "--keep-schedule-epochs", "2", "--output_dir", str(out)])
    lines = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    # 16 patches (32 px, patch 8): ratios 1.0, 0.625, 0.25, 0.25 -> 16, 10, 4, 4 patches
    assert [l["teacher_num_keep"] for l in lines] == [16, 10, 4, 4]
    assert [l["keep_ratio"] for l in lines] == pytest.approx([1.0, 10 / 16, 0.25, 0.25])
    # what the teacher really processed (the loss's own token meter): class token + kept patches
    assert [l["train_teacher_patch_share"] for l in lines] == pytest.approx([k / 16 for k in (16, 10, 4, 4)])
    per_epoch = [l["teacher_gflops_per_img"] for l in lines]
    assert per_epoch[0] > per_epoch[1] > per_epoch[2] == per_epoch[3]
    cost = json.loads((out / "supervision_cost.json").read_text())
    assert cost["teacher_gflops_scheduled"] == pytest.approx(sum(per_epoch) / 4)
    assert per_epoch[0] == pytest.approx(cost["teacher_gflops_full"], rel=0.02)   # all 16 kept ~ the full teacher
    assert per_epoch[3] == pytest.approx(cost["teacher_gflops_masked"])           # the target's count
    assert cost["teacher_saving"] == pytest.approx(1 - sum(per_epoch) / 4 / cost["teacher_gflops_full"])


def test_schedule_without_masking_is_refused(tmp_path, capsys):
    code = cli(RUN[:-4] + ["--keep-schedule", "linear", "--epochs", "1", "--output_dir", str(tmp_path)])
    assert code == 2 and "--keep-schedule" in capsys.readouterr().err
