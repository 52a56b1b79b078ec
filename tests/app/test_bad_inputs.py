"""main_maskedkd.py against bad input and faults: one clear line on stderr, exit code 2, nothing trained or lost.

Most cases call ``maskedkd_app.cli.cli`` in-process (it returns the exit code; an escaping exception fails the test,
which is what a traceback would be); a real process is used where the process boundary is the point: DataLoader
workers, two runs on one directory, the lock of a killed run. Runs as root here, so a chmod'ed directory stays
writable: read-only is exercised through a read-only tmpfs mount where mounting is allowed, and through a patched
write probe everywhere.
"""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from cli_helpers import ENV, FAST, RUN, STUDENT, distil, log_lines, refused, run_cli, set_flag
from tinymodels import ROOT, tiny

from maskedkd_app.cli import cli
from maskedkd_app import checkpoint as checkpoint_module
from maskedkd_app import preflight
from maskedkd_app.checkpoint import CheckpointError, read_checkpoint, save_atomic
from maskedkd_app.data import BAD_IMAGES_LOG, count_bad_images

# ------------------------------------------------------------------------------------- refused at start-up


def test_batch_size_larger_than_training_set(capsys):
    # Before: zero steps per epoch, train_loss 0.0, checkpoints written, exit 0.
    refused(set_flag(FAST + STUDENT, "--batch-size", "64"), capsys, "--batch-size 64", "16 images",
            "--batch-size 16 or less")


def test_epochs_zero(capsys):
    # Before: a bare AssertionError from the scheduler.
    refused(set_flag(FAST + STUDENT, "--epochs", "0"), capsys, "--epochs 0", "--epochs 1 or more")


def test_misspelt_model_suggests_close_names(capsys):
    refused(FAST + ["--model", "deit_tiny_patch16_2244"], capsys, "'deit_tiny_patch16_2244' is not a timm model",
            "did you mean deit_tiny_patch16_224")


def test_misspelt_teacher_model_suggests_close_names(teacher_ckpt, capsys):
    argv = set_flag(FAST + STUDENT + distil(teacher_ckpt), "--teacher-model", "deit_smal_patch16_224")
    refused(argv, capsys, "--teacher-model 'deit_smal_patch16_224'", "deit_small_patch16_224")


def test_unknown_model_kwarg_suggests_the_argument(capsys):
    argv = FAST + ["--model", "deit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "dept=2"]
    refused(argv, capsys, "--model deit_tiny_patch16_224", "'dept'", "did you mean depth", "--model-kwargs")


def test_unknown_teacher_kwarg_suggests_the_argument(teacher_ckpt, capsys):
    argv = set_flag(FAST + STUDENT + distil(teacher_ckpt), "--teacher-kwargs", "num_head=2")
    refused(argv, capsys, "--teacher-model deit_small_patch16_224", "'num_head'", "num_heads", "--teacher-kwargs")


def test_cnn_student_with_masking(teacher_ckpt, capsys):
    # Before: TypeError (img_size) traceback from timm.create_model.
    argv = FAST + ["--model", "resnet10t"] + distil(teacher_ckpt) + ["--keep-ratio", "0.5"]
    refused(argv, capsys, "--model resnet10t", "--mask-mode attention", "--mask-mode random")


def test_no_train_mode_with_masking(teacher_ckpt, capsys):
    # Before: "no student attention was captured ... run the student in train mode", not naming the flag.
    refused(FAST + STUDENT + distil(teacher_ckpt) + ["--no-train-mode"], capsys, "--no-train-mode",
            "--mask-mode attention")


@pytest.mark.parametrize("tau", ["nan", "inf"])
def test_non_finite_tau_on_the_command_line(tau, teacher_ckpt, capsys):
    # Before: accepted; the first non-finite loss was then blamed on the learning rate.
    refused(FAST + STUDENT + distil(teacher_ckpt) + ["--distillation-tau", tau], capsys,
            f"argument --distillation-tau: {tau} is not a finite number", "pass a finite number > 0")


def test_student_built_for_other_channel_count(capsys):
    # Before: a convolution shape error in the first training step.
    refused(FAST + STUDENT + ["in_chans=1"], capsys, "1-channel", "in_chans=1", "--model-kwargs")


def test_output_dir_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    refused(FAST + STUDENT + ["--output_dir", target], capsys, f"--output_dir {target} is a file")


def test_output_dir_under_a_file(tmp_path, capsys):
    # Before: FileExistsError/NotADirectoryError traceback after the models were built.
    (tmp_path / "taken").write_text("x")
    refused(FAST + STUDENT + ["--output_dir", tmp_path / "taken" / "run"], capsys, "cannot be created",
            "is a file")


def test_read_only_output_dir_refused_before_training(tmp_path, capsys, monkeypatch):
    # Root ignores permission bits, so the write probe is made to fail the way a read-only mount makes it fail.
    def read_only(directory):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(preflight, "_probe_write", read_only)
    out = tmp_path / "out"
    refused(FAST + STUDENT + ["--output_dir", out], capsys, f"--output_dir {out} is not writable",
            "Read-only file system")
    assert not (out / "checkpoint.pth").exists()


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mount (root with mount rights only), unmounted afterwards."""
    mount = tmp_path / "mnt"
    mount.mkdir()

    def make(*options):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(mount)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root with mount rights)")
        return mount

    yield make
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_read_only_mount_refused_before_training(tmpfs, capsys):
    mount = tmpfs("ro", "size=64k")
    refused(FAST + STUDENT + ["--output_dir", mount / "run"], capsys, "cannot be created", "Read-only file system")


# --------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory, teacher_ckpt):
    """One finished epoch of a distillation run: (output dir, its command line)."""
    out = tmp_path_factory.mktemp("trained")
    argv = FAST + STUDENT + distil(teacher_ckpt) + ["--keep-ratio", "0.5", "--output_dir", str(out)]
    assert cli(argv) == 0
    return out, argv


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("role", ["--resume", "--teacher-path"])
def test_truncated_checkpoint(fraction, role, trained, teacher_ckpt, tmp_path, capsys):
    source = trained[0] / "checkpoint.pth" if role == "--resume" else teacher_ckpt
    data = source.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: int(len(data) * fraction)])
    argv = FAST + STUDENT + distil(teacher_ckpt)
    argv = set_flag(argv, "--teacher-path", cut) if role == "--teacher-path" else argv + ["--resume", cut]
    refused(argv, capsys, f"corrupt or truncated checkpoint: {cut}", "re-download or re-copy")


def test_short_read_error_is_reported_as_truncation(tmp_path, monkeypatch):
    # The "[Errno 22] Invalid argument" for a truncated file: a reader seeking past the end of a short file.
    path = tmp_path / "short.pth"
    path.write_bytes(b"PK\x03\x04")

    def short_read(*args, **kwargs):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(checkpoint_module.torch, "load", short_read)
    with pytest.raises(CheckpointError, match=f"corrupt or truncated checkpoint: {path}.*re-download or re-copy"):
        read_checkpoint(path)


@pytest.mark.parametrize("flag,value,shown", [("--keep-ratio", "0.25", "--keep-ratio: checkpoint 0.5, now 0.25"),
                                              ("--lr", "1e-2", "--lr: checkpoint 0.002, now 0.01"),
                                              ("--distillation-type", "hard", "checkpoint 'soft', now 'hard'")])
def test_resume_with_changed_experiment_flags_is_refused(flag, value, shown, trained, capsys):
    # Before: auto-resume continued silently, ignoring the new lr and mixing two experiments in one log.
    out, argv = trained
    before = log_lines(out)
    refused(set_flag(set_flag(argv, flag, value), "--epochs", "2"), capsys, shown, "--resume-anyway",
            "new --output_dir")
    assert log_lines(out) == before


def _copy_run(out, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("checkpoint.pth", "log.txt"):
        (copy / name).write_bytes((out / name).read_bytes())
    return copy


def test_resume_with_reordered_kwargs_continues(trained, tmp_path, capsys):
    # The same experiment spelt differently (kwargs in another order, more epochs) is not a change.
    out, argv = trained
    copy = _copy_run(out, tmp_path)
    argv = set_flag(set_flag(argv, "--output_dir", copy), "--epochs", "2")
    start = argv.index("--model-kwargs") + 1
    argv[start:start + 4] = reversed(argv[start:start + 4])
    code, err, stdout = run_cli(argv, capsys)
    assert code == 0, err
    assert "continuing at epoch 1" in stdout and "--epochs 2 (the checkpoint's run had 1)" in stdout


def test_resume_anyway_and_harmless_flags(trained, tmp_path, capsys):
    out, argv = trained
    copy = _copy_run(out, tmp_path)
    argv = set_flag(set_flag(argv, "--output_dir", copy), "--epochs", "2")
    # Flags that do not change what is computed may differ freely.
    harmless = set_flag(argv, "--print-freq", "5")
    code, err, stdout = run_cli(harmless + ["--max-steps-per-epoch", "1", "--resume-anyway"], capsys)
    assert code == 0, err
    assert "--resume-anyway: continuing" in stdout and "--max-steps-per-epoch: checkpoint None, now 1" in stdout
    assert "continuing at epoch 1" in stdout and len(log_lines(copy)) == 2


def test_finetune_from_another_architecture_is_refused(tmp_path, capsys):
    # Before: a non-strict load that matched nothing (or half the blocks) and trained from random weights.
    other = tmp_path / "resnet.pth"
    torch.save({"model": tiny_resnet().state_dict()}, other)
    refused(FAST + STUDENT + ["--finetune", other], capsys, "shares no parameter name", str(other))
    partial = tmp_path / "partial.pth"
    state = tiny("deit_tiny_patch16_224", patch_size=8, depth=2, embed_dim=64, num_heads=2).state_dict()
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("blocks.1.")}}, partial)
    refused(FAST + STUDENT + ["--finetune", partial], capsys, "missing keys: blocks.1.")


def tiny_resnet():
    import timm
    return timm.create_model("resnet10t", num_classes=10)


def test_disk_full_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    # Before: the OSError escaped as a traceback (the atomic write already kept the old file).
    real_save = torch.save
    calls = {"checkpoint": 0}

    def filling_disk(obj, handle, *args, **kwargs):
        if os.path.basename(getattr(handle, "name", "")).startswith(".checkpoint.pth."):
            calls["checkpoint"] += 1
            if calls["checkpoint"] >= 2:  # epoch 1's save: half written, then the disk is full
                handle.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", filling_disk)
    out = tmp_path / "out"
    code, err, _ = run_cli(set_flag(FAST + STUDENT, "--epochs", "2") + ["--output_dir", out], capsys)
    assert code == 2 and "Traceback" not in err
    assert "No space left on device" in err and "previous checkpoint is intact" in err
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert read_checkpoint(out / "checkpoint.pth")["epoch"] == 0
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_disk_full_on_a_real_small_filesystem(tmpfs):
    mount = tmpfs("size=256k")
    save_atomic({"w": torch.zeros(1000)}, mount / "c.pth")
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        save_atomic({"w": torch.zeros(100_000)}, mount / "c.pth")
    assert torch.equal(read_checkpoint(mount / "c.pth")["w"], torch.zeros(1000))
    assert os.listdir(mount) == ["c.pth"]


# -------------------------------------------------------------------------------------------- two runs, lock


def test_second_run_on_a_busy_output_dir_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    # Before: both runs exited 0, one's checkpoints overwritten, every epoch logged twice.
    out = tmp_path / "out"
    first = set_flag(set_flag(RUN + STUDENT, "--epochs", "50"), "--print-freq", "1") + [
        "--data-set", "PROCEDURAL", "--procedural-train-size", "4000", "--procedural-val-size", "8",
        "--output_dir", str(out)]
    proc = subprocess.Popen([sys.executable, "main_maskedkd.py"] + first, cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, seen = time.time() + 300, ""
        while time.time() < deadline and "Epoch: [0]" not in seen:
            seen += proc.stdout.readline()
        assert "Epoch: [0]" in seen, seen[-2000:]
        refused(FAST + STUDENT + ["--output_dir", out], capsys, f"--output_dir {out} is in use by another run",
                f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kernel dropped the dead run's flock: the stale lock file does not block the next run.
    with preflight.OutputDirLock(out) as lock:
        assert f"pid {os.getpid()}" in lock.path.read_text()


def test_torchrun_ranks_all_stop_when_rank0_cannot_lock(tmp_path):
    # Rank 0 alone locks; the other ranks must learn of the refusal instead of waiting in a collective forever.
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from maskedkd_app.preflight import "
                               f"OutputDirLock; OutputDirLock({str(out)!r}).acquire(); print('locked', flush=True); "
                               "time.sleep(600)"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "main_maskedkd.py"] + FAST + STUDENT + ["--output_dir", str(out)],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert f"--output_dir {out} is in use by another run (pid {holder.pid}" in proc.stdout + proc.stderr
    assert not (out / "log.txt").exists()


# ------------------------------------------------------------------------------------------------- images


def _image_folder(root, *, size=32, per_class=4):
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (200 * c, 80, 40 * i)).save(folder / f"{i}.png")
    return root


def _folder_args(root):
    return set_flag(RUN, "--batch-size", "2") + STUDENT + ["--data-set", "IMFOLDER", "--data-path", str(root)]


def test_corrupt_image_is_named(tmp_path):
    # Before: OSError mid-epoch from a DataLoader worker, a traceback and no file name.
    root = _image_folder(tmp_path / "data")
    bad = root / "train" / "class1" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    argv = set_flag(_folder_args(root), "--num_workers", "1")
    proc = subprocess.run([sys.executable, "main_maskedkd.py"] + argv, cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"cannot read image {bad}" in proc.stderr and "--skip-bad-images" in proc.stderr


def test_skip_bad_images_logs_and_counts(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    bad = root / "train" / "class0" / "1.png"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    code, err, stdout = run_cli(_folder_args(root) + ["--skip-bad-images", "--output_dir", out], capsys)
    assert code == 0, err
    assert f"skipping unreadable image {bad}" in stdout and "skipped 1 unreadable image(s)" in stdout
    assert (out / BAD_IMAGES_LOG).read_text().split() == [str(bad)] and count_bad_images(str(out)) == 1


def test_nb_classes_disagreeing_with_the_folder(tmp_path, capsys):
    # Before: silently replaced by the folder's class count.
    root = _image_folder(tmp_path / "data")
    refused(_folder_args(root) + ["--nb-classes", "1000"], capsys, "--nb-classes 1000", "has 2 classes")


def test_image_smaller_than_the_crop_is_named(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    small = root / "train" / "class0" / "3.png"
    Image.new("RGB", (16, 16)).save(small)
    code, err, _ = run_cli(_folder_args(root) + ["--no-repeated-aug"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"image {small} is 16x16 px" in err and "--input-size" in err


def test_teacher_file_statistics_are_asked_for_not_guessed(teacher_ckpt, capsys):
    # timm's config for vit_small says 0.5/0.5 (its hub weights); the procedural pipeline normalises with
    # ImageNet's. Weights from a file could be either: the run must ask instead of re-normalising silently.
    argv = set_flag(FAST + STUDENT + distil(teacher_ckpt), "--teacher-model", "vit_small_patch16_224")
    refused(argv, capsys, "--teacher-model vit_small_patch16_224", "mean 0.5 0.5 0.5",
            "--teacher-mean 0.485 0.456 0.406")
    code, err, out = run_cli(argv + ["--teacher-mean", "0.485", "0.456", "0.406", "--teacher-std", "0.229", "0.224",
                                     "0.225"], capsys)
    assert code == 0, err
