"""main_maskedkd.py and the timm wrapper against inputs that gave a traceback, a silently wrong run or lost work.

Each case is refused as one line on stderr naming the flag and the fix (exit code 2), before a step trains, or
(interrupts, killed writes) leaves the run resumable. In-process through ``maskedkd_app.cli.cli``, tiny models.
"""
import json
import os

import pytest

from maskedkd_app import engine, train

from cli_helpers import FAST, STUDENT, distil, log_lines, refused, run_cli, set_flag

BASE = STUDENT + FAST


@pytest.mark.parametrize("items, says", [
    (["depth"], "'depth' is not KEY=VALUE"),          # timm's parser: a ValueError traceback
    (["=1"], "'=1' is not KEY=VALUE"),                # a keyword named ''
    (["num_heads="], "'num_heads=' is not KEY=VALUE"),  # an empty string reached the model
    (["depth=3"], "depth is given twice"),            # the last silently won
    (["--model-kwargs", "depth=1"], "given twice"),   # the second flag replaced the first whole
])
def test_malformed_model_kwargs_are_refused(items, says, capsys):
    refused(STUDENT + items + FAST, capsys, "--model-kwargs", says)


@pytest.mark.parametrize("flag, item, says", [
    ("--model-kwargs", "num_classes=5", "--nb-classes"),  # an index error deep in the loss
    ("--model-kwargs", "drop_path_rate=0.3", "--drop-path"),  # silently won over --drop-path
    ("--model-kwargs", "pretrained=True", "--finetune"),
    ("--teacher-kwargs", "num_classes=5", "data set's class count"),
])
def test_kwargs_a_flag_of_the_run_sets_are_refused(flag, item, says, teacher_ckpt, capsys):
    argv = BASE + distil(teacher_ckpt)
    argv.insert(argv.index(flag) + 1, item)
    refused(argv, capsys, f"{flag} {item.split('=')[0]}=", says)


@pytest.mark.parametrize("typed, meant", [
    ("--epoch", "--epochs"),            # a prefix was taken silently for --epochs
    ("--num-workers", "--num_workers"),  # DeiT mixes - and _
    ("--output-dir", "--output_dir"),
    ("--start-epoch", "--start_epoch"),
])
def test_an_abbreviated_or_misspelt_flag_names_the_real_one(typed, meant, capsys):
    refused(BASE + [typed, "1"], capsys, typed, f"did you mean {meant}")


@pytest.mark.parametrize("extra, says", [
    (["--sched", "none"], "--sched 'none'"),        # AttributeError on None.step after the first epoch
    (["--sched", "plateau"], "--sched 'plateau'"),  # stepped without a metric: the lr never dropped
    (["--sched", "cosinus"], "--sched 'cosinus'"),  # refused only once data and models were built
    (["--opt", "adamx"], "--opt 'adamx'"),
    (["--opt-betas", "0.9", "0.99", "0.5"], "takes 2 betas"),  # AdamW silently used the first two
    (["--opt", "sgd", "--opt-betas", "0.9", "0.99"], "takes no betas"),  # silently dropped
])
def test_optimizer_and_schedule_are_checked_at_start_up(extra, says, capsys):
    refused(BASE + extra, capsys, says)


def test_input_size_not_a_multiple_of_the_patch_is_refused(capsys):
    # 30 px with 8 px patches: timm floors the grid to 3x3 and the last 6 rows and columns were never seen.
    refused(set_flag(BASE, "--input-size", "30"), capsys, "--input-size 30", "patch size 8", "24 or 32")


def test_a_teacher_patch_that_does_not_divide_the_input_is_refused(teacher_ckpt, capsys):
    argv = set_flag(BASE + distil(teacher_ckpt), "--input-size", "24")  # student patch 8 fits, teacher 16 not
    argv[argv.index("--teacher-kwargs") + 1] = "patch_size=16"
    refused(argv, capsys, "--teacher-model", "patch size 16", "16 or 32")


def test_padding_models_may_take_any_input_size(tmp_path, capsys):
    argv = set_flag(BASE, "--input-size", "30") + ["--output_dir", str(tmp_path)]
    argv.insert(argv.index("--model-kwargs") + 1, "dynamic_img_pad=True")
    argv.insert(argv.index("--model-kwargs") + 1, "dynamic_img_size=True")
    code, err, _ = run_cli(argv, capsys)
    assert code == 0, err


@pytest.mark.parametrize("env, says", [
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "whole numbers"),  # int() traceback text, unnamed
    ({"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=3 WORLD_SIZE=2"),  # hung waiting for ranks
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE set in the environment but RANK"),  # silently one process
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR"),
])
def test_torchrun_variables_without_torchrun_are_refused(env, says, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused(BASE, capsys, says, "torchrun")


def test_ctrl_c_says_the_last_checkpoint_is_intact(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, err, _ = run_cli(BASE + ["--output_dir", out], capsys)
    assert code == 0, err
    real = engine.train_one_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    code, err, _ = run_cli(set_flag(BASE, "--epochs", "2") + ["--output_dir", out], capsys)
    assert code == 130 and "Traceback" not in err, err
    assert "interrupted" in err and "checkpoint.pth holds the last finished epoch" in err and "rerun" in err
    monkeypatch.setattr(train, "train_one_epoch", real)
    code, err, stdout = run_cli(set_flag(BASE, "--epochs", "2") + ["--output_dir", out], capsys)
    assert code == 0 and "continuing at epoch 1" in stdout, err


def test_a_killed_checkpoint_write_leaves_no_temp_file_behind(tmp_path, capsys):
    # save_atomic writes .checkpoint.pth.XXXX.tmp then renames: a kill -9 in between leaves a checkpoint-sized file,
    # one more per preempted restart. The next run (holding the lock) removes them.
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.pth.abc123.tmp", out / ".best_checkpoint.pth.def456.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1024)
    code, err, stdout = run_cli(BASE + ["--output_dir", out], capsys)
    assert code == 0, err
    assert not any(path.exists() for path in stale) and "unfinished checkpoint write" in stdout
    assert sorted(os.listdir(out)).count("checkpoint.pth") == 1


def test_resumed_past_epochs_reports_what_the_checkpoint_covers(tmp_path, capsys):
    out = tmp_path / "run"
    code, err, _ = run_cli(set_flag(BASE, "--epochs", "2") + ["--output_dir", out], capsys)
    assert code == 0, err
    code, err, stdout = run_cli(BASE + ["--output_dir", out], capsys)  # --epochs 1 now
    assert code == 0, err
    assert "covers 2 epochs (--epochs 1)" in stdout


@pytest.mark.parametrize("items", [["depth"], ["img_size=32", "img_size=64"]])
def test_timm_wrapper_refuses_malformed_teacher_kwargs(items, capsys):
    from deit_patch.timm_train import split_args
    with pytest.raises(SystemExit) as done:
        split_args(["--timm-train", "train.py", "--kd-model-kwargs", *items])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--kd-model-kwargs" in err


def test_resume_from_elsewhere_into_a_directory_holding_another_run_is_refused(tmp_path, capsys):
    # It overwrote that run's checkpoints and appended epochs 1 2 to a log already holding 0 1 2.
    kept, other = tmp_path / "kept", tmp_path / "other"
    for out, epochs in ((kept, "2"), (other, "1")):
        code, err, _ = run_cli(set_flag(BASE, "--epochs", epochs) + ["--output_dir", out], capsys)
        assert code == 0, err
    before = (kept / "checkpoint.pth").read_bytes()
    refused(set_flag(BASE, "--epochs", "2") + ["--output_dir", kept, "--resume", other / "checkpoint.pth"], capsys,
            "--resume", "another run's checkpoint.pth", "new --output_dir")
    assert (kept / "checkpoint.pth").read_bytes() == before and len(log_lines(kept)) == 2
    code, err, _ = run_cli(set_flag(BASE, "--epochs", "2") + ["--output_dir", other, "--resume",
                                                              other / "checkpoint.pth"], capsys)
    assert code == 0, err  # its own checkpoint, named explicitly: a plain resume


def test_resume_without_ema_state_names_the_flag_that_turns_ema_off(tmp_path, capsys):
    out = tmp_path / "run"
    code, err, _ = run_cli(BASE + ["--output_dir", out], capsys)  # --no-model-ema
    assert code == 0, err
    with_ema = [a for a in set_flag(BASE, "--epochs", "2") if a != "--no-model-ema"]
    refused(with_ema + ["--output_dir", out, "--resume-anyway"], capsys, "'model_ema'", "pass --no-model-ema")


def test_a_second_demo_into_the_same_directory_says_what_it_reused(tmp_path, capsys, monkeypatch):
    # The rerun resumed each finished arm, found nothing to train, and reported its few seconds as the arm's time.
    from maskedkd_app import demo, procs
    from maskedkd_app.args import parse_args
    for arm in demo.ARMS:
        (tmp_path / demo.arm_dir(arm)).mkdir()
        (tmp_path / demo.arm_dir(arm) / "log.txt").write_text(json.dumps({"epoch": 0, "test_acc1": 40.0}) + "\n")
    monkeypatch.setattr(procs, "run_processes", lambda jobs, **kw: ({key: 2.0 for key, _, _ in jobs}, []))
    summary = demo.run_demo(parse_args(["--demo", "--output_dir", str(tmp_path), "--device", "cpu"]),
                            cfg={"train_size": 128, "val_size": 64, "epochs": 1})
    out = capsys.readouterr().out
    assert "holds an earlier demo" in out and "earlier run |" in out
    assert all(arm["seconds"] is None for arm in summary["arms"].values())


def test_a_log_line_ahead_of_the_checkpoint_is_not_doubled_on_resume(tmp_path, capsys):
    # A run stopped after writing epoch 1's log line (or half of it) but before its checkpoint: the resume trains
    # epoch 1 again, and appended a second epoch-1 line (and kept the broken one) to log.txt.
    out = tmp_path / "run"
    code, err, _ = run_cli(BASE + ["--output_dir", out], capsys)
    assert code == 0, err
    with (out / "log.txt").open("a") as f:
        f.write(json.dumps({"epoch": 1, "test_acc1": 99.0}) + "\n" + '{"train_loss": 2.3, "te')
    code, err, stdout = run_cli(set_flag(BASE, "--epochs", "2") + ["--output_dir", out], capsys)
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in log_lines(out)] == [0, 1]
    assert len((out / "log.superseded.txt").read_text().splitlines()) == 2 and "moved to" in stdout


@pytest.mark.parametrize("extra, says", [
    (["--bce-loss"], "--bce-loss trains on the soft targets of mixup/cutmix"),  # failed at the first step
    (["--model-ema-decay", "1.0"], "argument --model-ema-decay: 1.0 is out of range"),  # EMA frozen at the init
    (["--decay-epochs", "3"], "--decay-epochs 3.0 has no effect without --sched step"),  # cosine ignores it
    (["--sched", "step", "--decay-epochs", "2", "--decay-rate", "0.5"], None),
    (["--sched", "multistep"], "--sched 'multistep'"),  # its milestones stayed timm's 30 60
    (["--cooldown-epochs", "20"], "--cooldown-epochs 20 has no effect"),  # the loop trains exactly --epochs
    (["--cooldown-epochs", "0"], None),  # what the recipes pass: says the same as the run does
])
def test_schedule_and_loss_flags_that_would_be_ignored_or_fail(extra, says, tmp_path, capsys):
    argv = BASE + extra + ["--output_dir", tmp_path]
    if says is None:
        code, err, _ = run_cli(argv, capsys)
        assert code == 0, err
    else:
        refused(argv, capsys, says)


def test_reproduce_into_another_output_dir_leaves_the_shipped_report_alone(tmp_path):
    # A trial run with its own --output-dir (here: nothing trained) overwrote results/procedural/REPRODUCTION.md.
    from tinymodels import ROOT
    from maskedkd_app import reproduce
    shipped = os.path.join(ROOT, "results", "procedural", "REPRODUCTION.md")
    before = open(shipped).read()
    try:
        reproduce.main(["--max-minutes", "0", "--seeds", "0", "--arms", "no KD", "--output-dir", str(tmp_path),
                        "--analysis-images", "0", "--no-mask-vis"])
        assert open(shipped).read() == before
    finally:  # a regression must not leave the repository's report damaged
        open(shipped, "w").write(before)
    assert "**Not run**" in (tmp_path / "REPRODUCTION.md").read_text()


@pytest.mark.parametrize("argv, says", [
    (["--root", "NOWHERE"], "holds no runs.json"),  # trained the teacher for minutes, then a FileNotFoundError
    (["--images", "0"], "argument --images: 0 is out of range"),
    (["--picture-seed", "-1"], "argument --picture-seed: -1 is out of range"),
])
def test_mask_study_refuses_a_root_without_a_reproduction_and_bad_numbers(argv, says, tmp_path, capsys):
    from maskedkd_app import mask_study
    argv = [str(tmp_path / "missing") if a == "NOWHERE" else a for a in argv]
    with pytest.raises(SystemExit) as done:
        mask_study.main(argv + ([] if "--root" in argv else ["--root", str(tmp_path)]))
    err = capsys.readouterr().err
    assert done.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("extra, flag, says", [
    (["--distillation-tau", "5000"], "--distillation-tau 5000", "above 1000"),  # the loss refused it by its own name
    (["--mask-guard", "fallback", "--probe-every", "0"], "--probe-every 0", "turns off"),
])
def test_loss_settings_the_plugin_refuses_are_refused_by_their_flag(extra, flag, says, teacher_ckpt,
                                                                     capsys):
    # The loss refuses these too, but in its own parameter names (tau=, probe_every=) after the teacher is built.
    refused(BASE + distil(teacher_ckpt) + extra, capsys, flag, says)
