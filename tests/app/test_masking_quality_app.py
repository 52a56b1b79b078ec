"""Is masking helping, in the application: per-epoch teacher figures in log.txt, the plot, the guard's flags, its
switch kept in the checkpoint across a resume, and a teacher the app trained itself read back with its own settings.
"""
import json
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import STUDENT
from deit_patch import quality
from maskedkd_app import train
from maskedkd_app.args import parse_args
from maskedkd_app.checkpoint import read_checkpoint

TEACHER_MODEL = ["--model", "vit_small_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "embed_dim=96",
                 "num_heads=2"]
FAST = ["--data-set", "PROCEDURAL", "--procedural-train-size", "64", "--procedural-val-size", "32",
        "--input-size", "32", "--batch-size", "16", "--epochs", "1", "--num_workers", "0", "--device", "cpu",
        "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--no-model-ema", "--print-freq", "2", "--no-flops",
        "--warmup-epochs", "0", "--lr", "2e-3", "--unscale-lr", "--no-repeated-aug"]


def log_lines(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def own_teacher(tmp_path_factory):
    """A ViT teacher trained by the app itself (one epoch): its checkpoint.pth stores the run's arguments."""
    out = tmp_path_factory.mktemp("teacher_run")
    train.main(parse_args(FAST + TEACHER_MODEL + ["--output_dir", str(out)]))
    return out / "checkpoint.pth"


def distil(own_teacher, out, *extra):
    return FAST + STUDENT + ["--distillation-type", "soft", "--teacher-path", str(own_teacher),
                             "--output_dir", str(out), *extra]


def test_own_checkpoint_is_a_teacher_with_its_own_name_kwargs_and_statistics(own_teacher, tmp_path, capsys):
    # vit_* names carry timm's 0.5/0.5 statistics, the procedural pipeline ImageNet's: from a foreign file this
    # is refused as ambiguous; our own checkpoint says which (and which model, and its kwargs).
    train.main(parse_args(distil(own_teacher, tmp_path / "out")))
    out = capsys.readouterr().out
    assert "maskedkd training checkpoint of --model vit_small_patch16_224" in out
    assert "--teacher-kwargs patch_size=8 depth=2 embed_dim=96 num_heads=2 from the checkpoint" in out
    assert "input statistics from the checkpoint's own data pipeline (mean 0.485 0.456 0.406" in out
    assert "same statistics, no conversion" in out  # the teacher is fed what it was trained on
    # a flag that is given wins, and is said
    train.main(parse_args(distil(own_teacher, tmp_path / "out2", "--teacher-mean", "0.5", "0.5", "0.5",
                                 "--teacher-std", "0.5", "0.5", "0.5")))
    out = capsys.readouterr().out
    assert "--teacher-mean/--teacher-std given; the checkpoint was trained with mean 0.485" in out
    assert "re-normalising the teacher's input" in out


def test_epoch_log_has_the_teacher_figures_and_the_plot(own_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(parse_args(distil(own_teacher, out, "--probe-every", "1", "--probe-images", "4", "--plots",
                                 "--epochs", "2")))
    lines = log_lines(out)
    for line in lines:
        assert line["train_teacher_patch_share"] == 0.5 and line["train_teacher_prefix_tokens"] == 1
        assert 0 <= line["train_teacher_acc1"] <= 100 and line["train_teacher_entropy"] >= 0
        assert line["train_probe_images"] == 4 * 4  # 64 images / batch 16 = 4 steps, 4 images each
        for key in ("train_probe_agree_mask", "train_probe_agree_random", "train_probe_kl_mask",
                    "train_probe_acc1_full", "train_mask_guard_fired"):
            assert key in line
    printed = capsys.readouterr().out
    assert printed.count("masked teacher: teacher saw 50% of its patches") == 2  # one summary per epoch
    png = out / "masking.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 350)


def test_fallback_switch_is_logged_checkpointed_and_kept_on_resume(own_teacher, tmp_path, monkeypatch):
    # Detection itself is tested in tests/plugin/test_quality.py on a constructed case; here every full window
    # is judged bad, to follow the switch through the application.
    monkeypatch.setattr(quality.MaskGuard, "check",
                        lambda self, result, reduce: {"probe_images": 64.0, "probe_agree_mask": 10.0,
                                                      "probe_agree_random": 50.0, "probe_kl_mask": 2.0,
                                                      "probe_kl_random": 1.0})
    out = tmp_path / "run"
    with pytest.warns(quality.MaskGuardWarning, match="Switching this run to the fallback"):
        train.main(parse_args(distil(own_teacher, out, "--probe-every", "1", "--mask-guard", "fallback")))
    (line,) = log_lines(out)
    assert line["mask_guard_switch"]["from"] == "attention" and line["mask_guard_switch"]["to"] == "random"
    assert line["train_mask_guard_fired"] == 1
    saved = read_checkpoint(out / "checkpoint.pth")["extra"]["mask_guard"]
    assert saved["switched"]["to"] == "random"
    monkeypatch.undo()  # the resumed run judges nothing bad: the switch must come from the checkpoint
    train.main(parse_args(distil(own_teacher, out, "--probe-every", "1", "--mask-guard", "fallback",
                                 "--epochs", "2")))
    first, second = log_lines(out)
    assert second["epoch"] == 1 and second["mask_guard_switch"] == first["mask_guard_switch"]
    assert not second["train_mask_guard_fired"]


def test_plots_need_an_output_dir():
    from maskedkd_app.args import check_args
    with pytest.raises(ValueError, match="--plots.*--output_dir"):
        check_args(parse_args(FAST + STUDENT + ["--plots"]))
