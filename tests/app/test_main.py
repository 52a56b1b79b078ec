"""main_maskedkd.py end to end on CPU: tiny models, a generated ImageFolder, real checkpoints and torchrun."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinymodels import ROOT, tiny, save_tiny_teacher

from maskedkd_app import build, train
from maskedkd_app.args import parse_args
from maskedkd_app.cli import cli
from maskedkd_app.checkpoint import read_checkpoint

STUDENT = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "embed_dim=64",
           "num_heads=2"]
DISTILLED = ["--model", "deit_tiny_distilled_patch16_224", "--model-kwargs", "patch_size=8", "depth=2",
             "embed_dim=64", "num_heads=2"]
TEACHER = ["--teacher-model", "deit_small_patch16_224", "--teacher-kwargs", "patch_size=8", "depth=2",
           "embed_dim=96", "num_heads=2"]
FAST = ["--input-size", "32", "--batch-size", "8", "--epochs", "1", "--num_workers", "0", "--device", "cpu",
        "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--no-model-ema", "--print-freq", "2", "--no-flops",
        "--warmup-epochs", "0", "--lr", "2e-3", "--unscale-lr"]
DETERMINISTIC = ["--no-aug", "--drop-path", "0", "--no-repeated-aug", "--smoothing", "0"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """4 classes, 12 train + 4 val images each: colour decides the class, so a few steps learn something."""
    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for split, count in (("train", 12), ("val", 4)):
        for c, colour in enumerate(colours):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                noise = (torch.rand(32, 32, 3, generator=g) * 80).to(torch.uint8)
                pixels = (torch.tensor(colour, dtype=torch.uint8) // 2 + noise).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A teacher matching TEACHER, saved in DeiT's format."""
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pth", num_classes=4)


def data(folder):
    return ["--data-set", "IMFOLDER", "--data-path", str(folder)]


def run(argv):
    return train.main(parse_args(argv))


def log_lines(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("kind,student,keep", [("soft", STUDENT, "0.5"), ("hard", STUDENT, "0.5"),
                                               ("soft", DISTILLED, "0.5"), ("hard", DISTILLED, "1.0"),
                                               ("soft", STUDENT, "1.0")])
def test_one_epoch_runs(kind, student, keep, image_folder, teacher_ckpt, tmp_path):
    out = tmp_path / "out"
    stats = run(data(image_folder) + FAST + student + TEACHER + [
        "--distillation-type", kind, "--teacher-path", str(teacher_ckpt), "--keep-ratio", keep,
        "--output_dir", str(out)])
    (line,) = log_lines(out)
    assert line["epoch"] == 0 and torch.isfinite(torch.tensor(line["train_loss"]))
    for key in ("train_lr", "test_acc1", "test_acc5", "train_images_per_s", "train_epoch_seconds"):
        assert key in line
    # the share of the teacher's patches it saw, and its prefix (class) token apart
    assert line["train_teacher_patch_share"] == pytest.approx(0.5 if keep == "0.5" else 1.0)
    assert line["train_teacher_prefix_tokens"] == 1
    assert (out / "checkpoint.pth").exists() and stats["test_acc1"] == line["test_acc1"]


def test_mixup_ema_and_cost_table(image_folder, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    argv = data(image_folder) + [a for a in FAST if a not in ("--no-model-ema", "--no-flops")]
    argv[argv.index("--mixup") + 1] = "0.8"
    run(argv + STUDENT + TEACHER + ["--distillation-type", "soft", "--teacher-path", str(teacher_ckpt),
                                    "--output_dir", str(out), "--clip-grad", "1.0"])
    printed = capsys.readouterr().out
    assert "teacher compute saved" in printed and "teacher GFLOPs/img, 8/16 patches" in printed
    cost = json.loads((out / "supervision_cost.json").read_text())
    assert 0.3 < cost["teacher_saving"] < 0.6
    line = log_lines(out)[0]
    assert line["teacher_gflops_per_img"] == pytest.approx(cost["teacher_gflops_masked"])
    assert "model_ema" in read_checkpoint(out / "checkpoint.pth")


def test_resume_equals_straight_run(image_folder, teacher_ckpt, tmp_path):
    common = data(image_folder) + FAST + DETERMINISTIC + STUDENT + TEACHER + [
        "--distillation-type", "soft", "--teacher-path", str(teacher_ckpt)]
    epochs = common.index("--epochs") + 1
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    two = list(common)
    two[epochs] = "2"
    run(two + ["--output_dir", str(straight)])
    run(common + ["--output_dir", str(resumed)])              # epoch 0 only
    run(two + ["--output_dir", str(resumed)])                 # auto-resume from checkpoint.pth: epoch 1
    a, b = log_lines(straight), log_lines(resumed)
    assert [l["epoch"] for l in b] == [0, 1]
    assert b[1]["train_loss"] == pytest.approx(a[1]["train_loss"], rel=1e-6, abs=1e-7)
    wa, wb = (read_checkpoint(d / "checkpoint.pth")["model"] for d in (straight, resumed))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def _cosine_lr_with_warmup(epoch, *, epochs, base, warmup_lr, min_lr, warmup_epochs=1):
    """The lr epoch ``epoch`` should train at: linear warm-up from warmup_lr, then half a cosine to min_lr."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def test_each_epoch_trains_at_its_own_scheduled_lr(image_folder, tmp_path):
    # DeiT steps the scheduler with `epoch` after epoch `epoch`, so epoch 1 repeated epoch 0's warm-up lr.
    sched = ["--warmup-epochs", "1", "--warmup-lr", "1e-5", "--min-lr", "1e-6", "--lr", "1e-3", "--sched", "cosine",
             "--cooldown-epochs", "0"]
    common = data(image_folder) + list(FAST) + DETERMINISTIC + STUDENT
    for flag in ("--warmup-epochs", "--lr"):  # FAST's values are replaced by sched's
        i = common.index(flag)
        del common[i:i + 2]
    epochs = common.index("--epochs") + 1
    expected = [_cosine_lr_with_warmup(e, epochs=3, base=1e-3, warmup_lr=1e-5, min_lr=1e-6) for e in range(3)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    three = list(common)
    three[epochs] = "3"
    run(three + sched + ["--output_dir", str(straight)])
    assert [l["train_lr"] for l in log_lines(straight)] == pytest.approx(expected, rel=1e-9)
    # Stopped after epoch 0 (a 1-epoch run) and resumed with --epochs 3: the command line's schedule continues.
    run(common + sched + ["--output_dir", str(resumed)])
    run(three + sched + ["--output_dir", str(resumed)])
    assert [l["train_lr"] for l in log_lines(resumed)] == pytest.approx(expected, rel=1e-9)


def test_eval_on_saved_checkpoint(image_folder, teacher_ckpt, tmp_path):
    out = tmp_path / "out"
    trained = run(data(image_folder) + FAST + STUDENT + ["--output_dir", str(out)])
    stats = run(data(image_folder) + FAST + STUDENT + ["--eval", "--resume", str(out / "checkpoint.pth")])
    assert stats["test_acc1"] == pytest.approx(trained["test_acc1"])


def _cli(argv, capsys):
    code = cli(argv)
    return code, capsys.readouterr().err


def test_bad_input_messages(image_folder, teacher_ckpt, tmp_path, capsys):
    base = FAST + STUDENT + TEACHER
    code, err = _cli(data(image_folder) + base + ["--distillation-type", "soft"], capsys)
    assert code == 2 and "needs --teacher-path" in err

    wrong = tmp_path / "wrong.pth"
    torch.save({"model": tiny("deit_small_patch16_224", num_classes=4).state_dict()}, wrong)
    code, err = _cli(data(image_folder) + base + ["--distillation-type", "soft", "--teacher-path", str(wrong)], capsys)
    assert code == 2 and "does not fit" in err and "shape mismatches" in err

    (tmp_path / "empty" / "train").mkdir(parents=True)
    code, err = _cli(data(tmp_path / "empty") + FAST + STUDENT, capsys)
    assert code == 2 and "val" in err

    code, err = _cli(data(image_folder) + base + ["--distillation-type", "soft", "--teacher-path", str(teacher_ckpt),
                                                  "--keep-ratio", "0.5", "--num-keep", "3"], capsys)
    assert code == 2 and "disagrees with num_keep=3" in err

    code, err = _cli(data(image_folder) + base + ["--distillation-type", "soft", "--teacher-path", str(teacher_ckpt),
                                                  "--len_num_keep", "40"], capsys)
    assert code == 2 and "num_keep=40 is outside [1, 16]" in err

    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Path("x")}, evil)  # a pickled object, not just tensors
    code, err = _cli(data(image_folder) + base + ["--distillation-type", "soft", "--teacher-path", str(evil)], capsys)
    assert code == 2 and "pickled" in err


def test_bad_input_has_no_traceback_in_a_real_process(image_folder, tmp_path):
    proc = subprocess.run([sys.executable, "main_maskedkd.py"] + data(tmp_path) + FAST + STUDENT,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "train" in proc.stderr


@pytest.mark.parametrize("fmt", ["deit", "plain", "module_prefix", "safetensors", "url"])
def test_teacher_loading_formats(fmt, tmp_path, monkeypatch):
    source = tiny("vit_small_patch16_224", patch_size=8, depth=2, embed_dim=96, num_heads=2, num_classes=4, seed=9)
    state = source.state_dict()
    path = tmp_path / ("t.safetensors" if fmt == "safetensors" else "t.pth")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "module_prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save({"model": state} if fmt in ("deit", "url") else state, path)
    where = str(path)
    if fmt == "url":
        where = "https://example.com/teacher.pth"
        monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                            lambda url, **kw: torch.load(path, map_location="cpu", weights_only=True))
    args = parse_args(FAST + TEACHER + ["--teacher-path", where])
    teacher = build.create_teacher(args, 4)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())
    assert teacher.global_pool == "token"  # DeiT's global_pool='avg' is not forced on a ViT teacher


def test_teacher_at_other_resolution_gets_resampled_position_embedding(tmp_path):
    source = tiny("vit_small_patch16_224", img_size=64, patch_size=8, depth=2, embed_dim=96, num_heads=2,
                  num_classes=4)
    torch.save({"model": source.state_dict()}, tmp_path / "t64.pth")
    args = parse_args(FAST + TEACHER + ["--teacher-path", str(tmp_path / "t64.pth")])
    teacher = build.create_teacher(args, 4)
    assert teacher.pos_embed.shape[1] == 1 + 16  # 64 px grid (8x8) resampled onto the 32 px input (4x4)
    assert torch.equal(teacher.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_cnn_teacher_keeps_deit_avg_pool(tmp_path):
    args = parse_args(FAST + ["--teacher-model", "resnet10t"])
    teacher = build.create_teacher(args, 4)
    assert teacher.global_pool.pool_type == "avg"


def test_torchrun_two_processes_match_one(image_folder, teacher_ckpt, tmp_path):
    common = data(image_folder) + FAST + DETERMINISTIC + STUDENT + TEACHER + [
        "--distillation-type", "soft", "--teacher-path", str(teacher_ckpt), "--dist-eval"]
    bs = common.index("--batch-size") + 1
    one, two = list(common), list(common)
    one[bs], two[bs] = "8", "4"  # the same global batch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "main_maskedkd.py"] + one + ["--output_dir", str(tmp_path / "one")],
                   cwd=ROOT, check=True, capture_output=True, env=env, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "main_maskedkd.py"] + two + ["--output_dir", str(tmp_path / "two")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = log_lines(tmp_path / "one")[0], log_lines(tmp_path / "two")[0]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5, abs=1e-6)
    assert b["test_acc1"] == pytest.approx(a["test_acc1"])
    assert not (tmp_path / "two" / "log.txt").read_text().count("\n") > 1  # rank 0 alone writes


def test_sigkill_mid_epoch_resumes_from_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    argv = ["--data-set", "PROCEDURAL", "--procedural-train-size", "1600", "--procedural-val-size", "64"] + FAST \
        + STUDENT + ["--output_dir", str(out)]
    argv[argv.index("--epochs") + 1] = "3"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "main_maskedkd.py"] + argv, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    seen = ""
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "Epoch: [1]" in line:  # epoch 0 is checkpointed and epoch 1 is under way
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "Epoch: [1]" in seen
    assert read_checkpoint(out / "checkpoint.pth")["epoch"] == 0
    done = subprocess.run([sys.executable, "main_maskedkd.py"] + argv, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "continuing at epoch 1" in done.stdout
    assert [l["epoch"] for l in log_lines(out)] == [0, 1, 2]
