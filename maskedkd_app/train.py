"""Training and evaluation, DeiT's main.py shape: ``main(args)`` builds everything once, then one loop over epochs.

Each epoch: ``engine.train_one_epoch``, ``engine.evaluate``, one JSON line in ``<output_dir>/log.txt``, the
resumable training state (``checkpoint.pth``) and the best weights (``best_checkpoint.pth``). Building is
``build.py``'s, the command line ``args.py``'s, the exit codes ``cli.py``'s.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.backends.cudnn as cudnn

from . import build, preflight
from . import distributed as dist_utils
from .args import check_args
from .checkpoint import (find_resume, gather_rng_states, load_training_state, read_checkpoint, require_training_state,
                         save_atomic, save_training_state)
from .data import BAD_IMAGES_LOG, count_bad_images
from .engine import evaluate, train_one_epoch
from .keep_schedule import KeepSchedule
from .run_plots import plot_run


def main(args) -> dict:
    """Train (or evaluate) as DeiT's main.py does; returns the last epoch's log record."""
    with contextlib.ExitStack() as run_scope:  # holds the --output_dir lock until the run ends, however it ends
        config = preflight.experiment_config(args)  # as given: args.lr is rescaled in place below
        build.adopt_teacher_checkpoint_args(args)  # a teacher trained by this app says how it was built
        check_args(args)
        dist_utils.init_distributed_mode(args)
        device = _resolve_device(args)
        _seed_everything(args)
        cudnn.benchmark = True
        print(args)
        _claim_output_dir(args, run_scope)
        preflight.check_input_files({"--resume": args.resume, "--finetune": args.finetune,
                                     "--teacher-path": args.teacher_path if args.distillation_type != "none" else ""})
        resume = find_resume(args.output_dir, args.resume)
        _check_resume_target(args)
        _check_weights_to_use(args, resume)
        _check_resume_config(args, config, resume)

        data = build.build_data(args)
        mixup_fn = build.build_mixup(args)
        model = build.build_student(args, device)
        model_ema = build.build_ema(args, model)
        model_without_ddp = model
        if args.distributed:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if args.gpu is not None
                                                              else None)
        n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
        print("number of params:", n_parameters)
        if args.eval:  # nothing below (optimizer, teacher, loss) is needed to evaluate
            build.load_weights(model_without_ddp, resume or args.finetune, strict=True, what="weights to evaluate")
            test_stats = evaluate(data.loader_val, model, device, amp_dtype=args.amp_dtype, reduce=args.dist_eval)
            print(f"Accuracy of the network on the {len(data.val)} test images: {test_stats['acc1']:.1f}%")
            return {f"test_{k}": v for k, v in test_stats.items()}
        optimizer, lr_scheduler, loss_scaler = build.build_optimizer(args, model_without_ddp, device)

        teacher = build.build_teacher(args, device)
        criterion = build.checked_criterion(args, model=model, teacher=teacher, mixup_active=mixup_fn is not None)
        print(criterion.describe())
        feature_heads = build.add_feature_heads(args, criterion, optimizer)
        if feature_heads is not None:
            lr_scheduler = build.build_scheduler(args, optimizer)  # so that it sees the heads' param groups
        keep_schedule = KeepSchedule.from_args(args, criterion)
        if keep_schedule is not None:
            print(keep_schedule.describe())
        cost = None
        if teacher is not None and not args.no_flops and dist_utils.is_main_process():
            cost = criterion.supervision_cost(img_size=(args.input_size, args.input_size), student=model_without_ddp)
            if keep_schedule is not None:  # the run's teacher cost is the schedule's average, not the target's
                cost = keep_schedule.integrate(cost, teacher=teacher, img_size=(args.input_size, args.input_size))
            print("Supervision cost (fvcore, per image):\n" + cost.table())

        output_dir = Path(args.output_dir) if args.output_dir else None
        if output_dir and dist_utils.is_main_process():
            output_dir.mkdir(parents=True, exist_ok=True)
            if cost is not None:
                (output_dir / "supervision_cost.json").write_text(json.dumps(cost.as_dict(), indent=1))

        max_accuracy = 0.0
        if resume:
            schedule = copy.deepcopy(lr_scheduler.state_dict())
            args.start_epoch = load_training_state(resume, model=model_without_ddp, optimizer=optimizer,
                                                   lr_scheduler=lr_scheduler, scaler=loss_scaler,
                                                   model_ema=model_ema, feature_heads=feature_heads)
            if lr_scheduler.state_dict() != schedule:
                # timm schedulers are a function of their settings and the epoch; the command line's settings win,
                # so `--epochs 300` resumed from a run started with `--epochs 100` follows the 300-epoch schedule.
                print("note: the schedule settings differ from the checkpoint's: following the command line")
                lr_scheduler.load_state_dict(schedule)
            extra = read_checkpoint(resume).get("extra", {})
            max_accuracy = float(extra.get("max_accuracy", 0.0))
            criterion.load_guard_state(extra.get("mask_guard"))  # a fallback switch stays switched
            print(f"Resumed from {resume}: continuing at epoch {args.start_epoch}")
        if output_dir and dist_utils.is_main_process():  # fresh (start 0) or resumed: epochs this run will log
            _drop_log_lines_from(output_dir / "log.txt", args.start_epoch)

        recorder = build.build_mask_recorder(args, criterion, teacher)
        print(f"Start training for {args.epochs} epochs")
        start_time = time.time()
        log_stats: dict = {}
        # Epoch e trains at the schedule's value for e (as timm's train.py does). DeiT steps with `epoch` after epoch
        # `epoch`, which repeats epoch 0's lr in epoch 1 (two warm-up epochs at --warmup-lr for --warmup-epochs 1).
        # Setting the start epoch's value here also makes a resumed run continue on the same schedule.
        lr_scheduler.step(args.start_epoch)
        for epoch in range(args.start_epoch, args.epochs):
            data.sampler_train.set_epoch(epoch) if hasattr(data.sampler_train, "set_epoch") else None
            epoch_keep = keep_schedule.apply(epoch) if keep_schedule is not None else {}
            if recorder is not None:
                recorder.start_epoch(epoch, is_first=epoch == 0, is_last=epoch == args.epochs - 1)
            train_stats = train_one_epoch(
                model, criterion, data.loader_train, optimizer, device, epoch, loss_scaler=loss_scaler,
                amp_dtype=args.amp_dtype, max_norm=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn,
                set_training_mode=args.train_mode, bce_loss=args.bce_loss, print_freq=args.print_freq,
                mask_recorder=recorder, max_steps=args.max_steps_per_epoch)
            lr_scheduler.step(epoch + 1)
            if args.skip_bad_images and count_bad_images(args.output_dir):
                print(f"skipped {count_bad_images(args.output_dir)} unreadable image(s) so far (--skip-bad-images), "
                      f"listed in {os.path.join(args.output_dir, BAD_IMAGES_LOG)}")
            test_stats = evaluate(data.loader_val, model, device, amp_dtype=args.amp_dtype, reduce=args.dist_eval)
            max_accuracy = max(max_accuracy, test_stats["acc1"])
            print(f"Accuracy of the network on the {len(data.val)} test images: {test_stats['acc1']:.1f}%  "
                  f"(max {max_accuracy:.2f}%)")
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                         **{f"test_{k}": v for k, v in test_stats.items()},
                         "epoch": epoch, "n_parameters": n_parameters}
            if cost is not None:
                log_stats.update(_cost_stats(cost))
                if keep_schedule is not None:  # this epoch's keep, not the run's average
                    log_stats["teacher_gflops_per_img"] = cost.extra_teacher + keep_schedule.epoch_gflops(
                        epoch, teacher=teacher, img_size=(args.input_size, args.input_size))
            log_stats.update(epoch_keep)
            switched = criterion.guard_state().get("switched")
            if switched:
                log_stats["mask_guard_switch"] = {k: switched[k] for k in ("from", "to", "at_step")}
            # Every rank's RNG streams, so that each resumes its own (a collective: every rank takes part).
            rng_states = gather_rng_states() if output_dir else None
            if output_dir and dist_utils.is_main_process():
                # The log line first: a stop between the two leaves it ahead of the checkpoint, and the resume
                # redoes that epoch and moves the line aside (_drop_log_lines_from), so no epoch is missing or doubled.
                with (output_dir / "log.txt").open("a") as f:
                    f.write(json.dumps(log_stats) + "\n")
                extra = {"max_accuracy": max_accuracy, "mask_guard": criterion.guard_state()}
                save_training_state(output_dir / "checkpoint.pth", model=model_without_ddp, optimizer=optimizer,
                                    lr_scheduler=lr_scheduler, epoch=epoch, args=args, scaler=loss_scaler,
                                    model_ema=model_ema, extra=extra, feature_heads=feature_heads, config=config,
                                    rng_states=rng_states)
                if test_stats["acc1"] >= max_accuracy:
                    save_atomic({"model": model_without_ddp.state_dict(), "epoch": epoch},
                                output_dir / "best_checkpoint.pth")
                if args.plots:
                    draw_safely("--plots", epoch, lambda: print(f"plots: {plot_run(output_dir)}"))
            if recorder is not None:  # after the checkpoint: a picture that cannot be drawn costs no training
                draw_safely("--mask-vis", epoch, lambda: recorder.end_epoch(epoch, is_last=epoch == args.epochs - 1))
            dist_utils.barrier()
        if args.start_epoch >= args.epochs:  # a finished run found in output_dir: report it instead of retraining
            print(f"Nothing to train: the checkpoint already covers {args.start_epoch} epochs (--epochs "
                  f"{args.epochs})")
            test_stats = evaluate(data.loader_val, model, device, amp_dtype=args.amp_dtype, reduce=args.dist_eval)
            log_stats = {f"test_{k}": v for k, v in test_stats.items()}
        total = str(datetime.timedelta(seconds=int(time.time() - start_time)))
        print(f"Training time {total}")
        log_stats["max_accuracy"] = max(max_accuracy, log_stats.get("test_acc1", 0.0))
        if cost is not None:
            log_stats.update(_cost_stats(cost))
        return log_stats


def _resolve_device(args) -> torch.device:
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: running on CPU")
        args.device = "cpu"
    if args.amp_dtype is None:
        args.amp_dtype = "bf16" if str(args.device).startswith("cuda") else "none"
    return torch.device(args.device)


def _seed_everything(args) -> None:
    seed = args.seed + dist_utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# The files a run writes in --output_dir (checked at start-up: a directory of one of these names would only fail
# when the first epoch is done).
SUPERSEDED_LOG = "log.superseded.txt"
OUTPUT_FILES = ("checkpoint.pth", "best_checkpoint.pth", "log.txt", "supervision_cost.json", BAD_IMAGES_LOG,
                SUPERSEDED_LOG)


def _claim_output_dir(args, run_scope: contextlib.ExitStack) -> None:
    """Rank 0 proves every output path writable (--output_dir, its files, --mask-vis) and locks --output_dir before
    anything is built; every rank learns the answer."""
    error = None
    if dist_utils.is_main_process():
        try:
            if args.output_dir:
                directory = preflight.check_output_dir(args.output_dir)
                run_scope.enter_context(preflight.OutputDirLock(directory))
                _remove_interrupted_writes(directory)
                from .run_plots import PLOT_NAME  # here: it imports matplotlib
                preflight.check_output_files(directory, OUTPUT_FILES + (PLOT_NAME,))
            if args.mask_vis and not args.eval:
                preflight.check_output_dir(args.mask_vis, flag="--mask-vis")
        except preflight.RunError as refusal:
            error = refusal
    preflight.agree_across_ranks(error)


def _check_resume_target(args) -> None:
    """``--resume`` from elsewhere into an --output_dir that holds another run: its checkpoint.pth and
    best_checkpoint.pth were overwritten and its log.txt got the resumed epochs a second time (0 1 2 1 2)."""
    if not args.resume or args.eval or not args.output_dir or "://" in args.resume:
        return
    own = os.path.join(args.output_dir, "checkpoint.pth")
    if os.path.isfile(own) and os.path.isfile(args.resume) and not os.path.samefile(own, args.resume):
        raise preflight.RunError(
            f"--resume {args.resume} into --output_dir {args.output_dir}, which holds another run's checkpoint.pth: "
            "it would be overwritten and log.txt would repeat epochs; pass a new --output_dir, or drop --resume to "
            f"continue the run in {args.output_dir}")


def _log_epoch(line: str):
    try:
        return json.loads(line).get("epoch")
    except (ValueError, AttributeError):
        return -1  # a line cut short by a kill or a full disk: not an epoch's record


def _drop_log_lines_from(path: Path, start_epoch: int) -> None:
    """Move log.txt lines of epochs this run trains (again), and lines cut short, to log.superseded.txt, so that
    the log holds each epoch once. They come from a run that stopped before its checkpoint of that epoch."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
    kept = [line for line in lines if 0 <= (_log_epoch(line) or 0) < start_epoch]
    if len(kept) == len(lines):
        return
    with (path.parent / SUPERSEDED_LOG).open("a") as f:  # kept, not deleted: a person may want those numbers
        f.writelines(line if line.endswith("\n") else line + "\n" for line in lines if line not in kept)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text("".join(kept))
    os.replace(temp, path)  # atomic: a kill now leaves the old or the new log, never half of one
    print(f"note: {path} held {len(lines) - len(kept)} line(s) of epoch {start_epoch} or later (or cut short) from "
          f"a run that stopped before its checkpoint: moved to {SUPERSEDED_LOG}; those epochs are logged again")


def _remove_interrupted_writes(directory: Path) -> None:
    """Delete the temp files of checkpoint writes a killed run left (``save_atomic``'s ``.checkpoint.pth.*.tmp``).

    The kill left the previous checkpoint whole, but each such file is a full checkpoint's size: a run killed and
    restarted over and over (preemption) would fill the disk with them. Called under the --output_dir lock, so no
    live run is writing them.
    """
    for name in ("checkpoint.pth", "best_checkpoint.pth"):
        for stale in Path(directory).glob(f".{name}.*.tmp"):
            stale.unlink()
            print(f"removed {stale}: an unfinished checkpoint write of an interrupted run")


def _check_weights_to_use(args, resume) -> None:
    """Evaluating, or starting at a later epoch, needs the weights that make it true; refuse it without them."""
    if args.eval:
        if not resume and not args.finetune:
            raise preflight.RunError(
                "--eval evaluates trained weights, and none were given: pass --resume CHECKPOINT (a checkpoint.pth "
                "or a weights file), --finetune WEIGHTS, or the --output_dir of a run that left checkpoint.pth; "
                "otherwise the accuracy reported would be the randomly initialised student's")
        return
    if args.start_epoch and not resume:
        raise preflight.RunError(
            f"--start_epoch {args.start_epoch} but there is no checkpoint to resume (no --resume, no checkpoint.pth "
            f"in --output_dir): epochs 0 to {args.start_epoch - 1} were never trained, so the run would "
            + ("report a random model as finished" if args.start_epoch >= args.epochs
               else f"train random weights from epoch {args.start_epoch}'s learning rate")
            + "; pass --resume CHECKPOINT, or drop --start_epoch")


def draw_safely(flag: str, epoch: int, draw) -> None:
    """Run ``draw()`` (a picture of the run); if it fails, say so on one line and go on training.

    Pictures are drawn after the epoch's checkpoint and log line are written, and their failure (a full disk,
    a path that became a file, a matplotlib error) never stops a run.
    """
    try:
        draw()
    except (OSError, ValueError, RuntimeError) as error:
        print(f"warning: {flag}: the pictures of epoch {epoch} could not be drawn ({type(error).__name__}: "
              f"{error}); training goes on, the checkpoint and log are written")


def _cost_stats(cost) -> dict:
    """The per-image GFLOPs logged each epoch (fvcore counts; training = 3x forward)."""
    return {"teacher_gflops_per_img": cost.teacher_per_step, "teacher_gflops_full": cost.teacher_full,
            "student_gflops_train": cost.student_train, "feature_heads_gflops_train": 3.0 * cost.feature_heads}


def _check_resume_config(args, config: dict, resume) -> None:
    """A resume continues the same experiment: other experiment flags are refused unless --resume-anyway says so.

    Read before anything is built: a --resume that is no training state, or a --start_epoch that disagrees with the
    checkpoint's epoch, is refused here rather than after the data and models are ready.
    """
    if not resume or args.eval:
        return
    state = read_checkpoint(resume)
    require_training_state(state, source=resume)
    continues_at = int(state["epoch"]) + 1
    if args.start_epoch and args.start_epoch != continues_at:
        raise preflight.RunError(
            f"--start_epoch {args.start_epoch} but {resume} continues at epoch {continues_at}: a resume starts where "
            "its checkpoint ended; drop --start_epoch")
    saved = state.get("config")
    saved = dict(saved) if isinstance(saved, dict) else None
    if saved is None:
        print(f"note: {resume} predates stored run configurations: its flags cannot be compared with this run's")
        return
    if saved.get("epochs") != config.get("epochs"):
        print(f"note: --epochs {config.get('epochs')} (the checkpoint's run had {saved.get('epochs')})")
    changes = preflight.config_differences(saved, config)
    if not changes:
        return
    if not args.resume_anyway:
        raise preflight.RunError(
            f"{resume} was written with other experiment flags ({'; '.join(changes)}): resuming would mix two "
            "experiments in one run and log; pass a new --output_dir, or --resume-anyway to continue with the new "
            "flags")
    print(f"note: --resume-anyway: continuing {resume} with changed flags: {'; '.join(changes)}")
