"""python -m deit_patch.timm_train: masking flags that would be ignored, and keep settings the teacher cannot take,
are refused before timm's train.py builds anything (one line, exit code 2)."""
import sys

import pytest
import torch

from deit_patch.timm_task import has_logit_task

pytestmark = pytest.mark.skipif(not has_logit_task, reason="timm.task.LogitDistillationTask needs timm >= 1.0.23")

# A train.py shaped like timm's: its parser and _parse_args at import, training only under __main__. Its main()
# records that it ran (the refusals must come before it) and builds the task with a 16-patch tiny teacher module.
TRAIN_PY = """
import argparse
import torch.nn as nn
from timm.task import LogitDistillationTask
from tinymodels import tiny

parser = argparse.ArgumentParser()
parser.add_argument("--kd-model-name", default=None)
parser.add_argument("--kd-distill-type", default="logit", choices=["logit", "feature", "token"])
parser.add_argument("--ran", required=True)


def _parse_args():
    return parser.parse_args(), ""


def main():
    args, _ = _parse_args()
    open(args.ran, "w").write("train.py ran")
    if args.kd_model_name:
        task = LogitDistillationTask(student_model=tiny(seed=0), teacher_model=tiny(seed=1),
                                     criterion=nn.CrossEntropyLoss(), verbose=False)
        print("TASK", type(task).__name__, task.masked_teacher.num_keep)


if __name__ == "__main__":
    main()
"""
# The teacher as train.py names it: deit_tiny at 32 px with 8 px patches has 16 patches, like tiny(seed=1).
TEACHER = ["--kd-model-name", "deit_tiny_patch16_224", "--kd-model-kwargs", "img_size=32", "patch_size=8",
           "depth=2"]


@pytest.fixture
def wrapper(tmp_path, monkeypatch, capsys):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_PY)
    ran = tmp_path / "ran.txt"

    def call(*argv):
        from deit_patch.timm_train import main
        monkeypatch.setattr(sys, "argv", ["timm_train", "--timm-train", str(script), "--ran", str(ran), *argv])
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code
        captured = capsys.readouterr()
        return code, captured.err, captured.out, ran.exists()

    return call


def refused(wrapper, argv, *needles):
    code, err, out, ran = wrapper(*argv)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("deit_patch.timm_train: error: "), err
    for needle in needles:
        assert needle in err, err
    assert not ran, "train.py ran before the refusal"


def test_keep_ratio_on_a_run_that_distils_nothing_is_refused(wrapper):
    # Before: train.py trained without a teacher and --keep-ratio was ignored silently.
    refused(wrapper, ["--keep-ratio", "0.5"], "--keep-ratio configures the KD teacher", "no --kd-model-name",
            "add --kd-model-name TEACHER, or drop --keep-ratio")


def test_teacher_flags_on_a_run_that_distils_nothing_are_refused(wrapper, tmp_path):
    torch.save({}, tmp_path / "t.pth")
    refused(wrapper, ["--mask-mode", "random", "--kd-checkpoint", str(tmp_path / "t.pth")],
            "--mask-mode, --kd-checkpoint configure the KD teacher")


def test_masking_flags_with_feature_distillation_are_refused(wrapper):
    # Before: a warning after the whole run that nothing had been masked.
    refused(wrapper, TEACHER + ["--kd-distill-type", "feature", "--num-keep", "8"], "--num-keep",
            "--kd-distill-type feature", "unmasked")


@pytest.mark.parametrize("argv,needles", [
    (["--keep-ratio", "0"], ["argument --keep-ratio: 0 is out of range", "(0, 1]"]),
    (["--keep-ratio", "1.5"], ["argument --keep-ratio: 1.5 is out of range"]),
    (["--keep-ratio", "nan"], ["argument --keep-ratio: nan is not a finite number"]),
    (["--num-keep", "0"], ["argument --num-keep: 0 is out of range", ">= 1"]),
    (["--num-keep", "four"], ["argument --num-keep: four is not a whole number"]),
    (["--num-keep", "40"], ["--num-keep 40 does not fit the KD teacher deit_tiny_patch16_224 (16 patches)",
                            "outside [1, 16]"]),
    (["--keep-ratio", "0.5", "--num-keep", "3"], ["--keep-ratio 0.5 --num-keep 3 does not fit",
                                                  "(8 of 16 patches) disagrees with num_keep=3"]),
    (["--mask-mode", "none", "--keep-ratio", "0.5"], ["--mask-mode none runs the whole teacher"]),
])
def test_keep_flags_the_teacher_cannot_take_are_refused_before_train_py_runs(argv, needles, wrapper):
    # Before: a ValueError traceback once train.py had built the data, the student and the teacher.
    refused(wrapper, TEACHER + argv, *needles)


def test_an_abbreviated_train_py_flag_is_read_as_train_py_reads_it(wrapper):
    # train.py's parser takes '--kd-model' for --kd-model-name: the pre-check asks that parser, not the raw text.
    refused(wrapper, ["--kd-model", *TEACHER[1:], "--num-keep", "40"], "(16 patches)")


@pytest.mark.parametrize("teacher, why", [
    ("resnet10t", "a convolutional network"),
    ("swin_tiny_patch4_window7_224", "shifted-window attention"),  # was told it was a CNN with no patch tokens
])
def test_an_unmaskable_teacher_with_a_keep_setting_is_refused_with_its_reason(teacher, why, wrapper):
    refused(wrapper, ["--kd-model-name", teacher, "--keep-ratio", "0.5"], "--keep-ratio 0.5", teacher,
            "cannot be masked", why, "distils unmasked")


def test_a_valid_keep_setting_runs(wrapper):
    code, err, out, ran = wrapper(*TEACHER, "--num-keep", "6", "--no-flops")
    assert code == 0 and ran, err
    assert "TASK MaskedLogitDistillationTask 6" in out
