"""What the application's command-line tests share: tiny model flags, a fast procedural run, and the refusal check
(exit code 2, one line on stderr naming every needle, no traceback, nothing trained)."""
import os
from pathlib import Path

from maskedkd_app.cli import cli

STUDENT = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "embed_dim=64",
           "num_heads=2"]
TEACHER = ["--teacher-model", "deit_small_patch16_224", "--teacher-kwargs", "patch_size=8", "depth=2",
           "embed_dim=96", "num_heads=2"]
RUN = ["--input-size", "32", "--batch-size", "8", "--epochs", "1", "--num_workers", "0", "--device", "cpu",
       "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--no-model-ema", "--print-freq", "1", "--no-flops",
       "--warmup-epochs", "0", "--lr", "2e-3", "--unscale-lr"]
PROCEDURAL = ["--data-set", "PROCEDURAL", "--procedural-train-size", "16", "--procedural-val-size", "8"]
FAST = RUN + PROCEDURAL
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def distil(teacher_ckpt, keep=None):
    """Soft distillation from the tiny teacher checkpoint, at ``keep`` when given."""
    flags = TEACHER + ["--distillation-type", "soft", "--teacher-path", str(teacher_ckpt)]
    return flags + (["--keep-ratio", keep] if keep is not None else [])


def set_flag(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def run_cli(argv, capsys):
    code = cli([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def refused(argv, capsys, *needles):
    """Exit code 2, one line on stderr naming every needle, no traceback, and no training step taken."""
    code, err, out = run_cli(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert "Epoch: [" not in out
    return err


def log_lines(out):
    path = Path(out) / "log.txt"
    return path.read_text().splitlines() if path.exists() else []
