"""DeiT's main.py with MaskedKD: the teacher sees only the patches the student attends to.

    torchrun --nproc_per_node=8 main_maskedkd.py --model deit_small_patch16_224 \
        --teacher-model deit_base_patch16_224 --teacher-path teacher.pth --distillation-type soft \
        --keep-ratio 0.5 --data-path /imagenet --output_dir out/

Every DeiT command line works unchanged; the masking flags are new. ``--demo`` runs a small end-to-end
distillation on the built-in procedural dataset (no files, no downloads).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.backends.cudnn as cudnn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler

from maskedkd_app import distributed as dist_utils
from deit_patch.capture import CaptureError
from maskedkd_app.checkpoint import (CheckpointError, extract_state_dict, find_resume, load_state_checked,
                                   load_training_state, read_checkpoint, save_atomic, save_training_state,
                                   saved_config)
from maskedkd_app.data import BAD_IMAGES_LOG, DataError, build_dataset, build_loaders, count_bad_images, data_stats
from maskedkd_app.engine import NonFiniteLossError, evaluate, train_one_epoch
from maskedkd_app.keep_schedule import KeepSchedule
from maskedkd_app import preflight
from maskedkd_app.args import check_args, get_args_parser
from deit_patch.teacher_input import TeacherInputError, model_stats, stats_differ
from deit_patch.teachers import UnsupportedTeacherError, find_family, teacher_grid
from losses import MaskedDistillationLoss

# OSError: files, disks and network are the environment's, and their message names the path (disk full on log.txt).
USER_ERRORS = (CheckpointError, DataError, UnsupportedTeacherError, CaptureError, TeacherInputError, ValueError,
               OSError)


# ------------------------------------------------------------------------------------------------ model set-up
def _family_filter(model: torch.nn.Module):
    """timm's own checkpoint adapter for the model's module (resamples position embeddings, patch kernels)."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None) if module and module.__name__.startswith("timm") else None


def load_weights(model: torch.nn.Module, path: str, *, strict: bool, what: str, drop_mismatched_head: bool = False):
    """Load a checkpoint into ``model`` the way timm adapts pretrained weights, with CheckpointError on misfit."""
    state = extract_state_dict(read_checkpoint(path))
    adapt = _family_filter(model)
    if adapt is not None:
        try:
            state = adapt(state, model)
        except Exception as error:  # the adapter's own complaint is not actionable; the shape report below is
            print(f"note: timm's checkpoint adapter skipped ({type(error).__name__}: {error})")
    if drop_mismatched_head:
        own = model.state_dict()
        for key in [k for k in state if k.startswith(("head", "head_dist")) and k in own
                    and state[k].shape != own[k].shape]:
            print(f"Removing key {key} from pretrained checkpoint")
            del state[key]
    # A fine-tune may re-initialise the head (and a distillation token the checkpoint lacks), nothing else: any
    # other missing tensor means the checkpoint is another architecture and would leave it silently random.
    load_state_checked(model, state, strict=strict, source=path, what=what,
               fix="Does the model name match the checkpoint's architecture, and the class count the dataset's?",
               may_miss=("head.", "head_dist.", "dist_token") if drop_mismatched_head else ())


def create_teacher(args, nb_classes: int) -> torch.nn.Module:
    """The teacher from its timm name, at the student's resolution when it is a patch-token model.

    DeiT forces global_pool='avg' on its (RegNetY) teacher; that would silently change a token-pooled ViT, so it
    is kept only for models without patch tokens.
    """
    common = dict(flag="--teacher-model", kwargs_flag="--teacher-kwargs", extra=args.teacher_kwargs,
                  pretrained=False, num_classes=nb_classes)
    teacher = preflight.create_model_checked(args.teacher_model, img_size=args.input_size, **common)
    if find_family(teacher) is None and not hasattr(teacher, "patch_embed"):
        teacher = preflight.create_model_checked(args.teacher_model, global_pool="avg", **common)
    if args.teacher_path:
        load_weights(teacher, args.teacher_path, strict=True, what="teacher checkpoint")
    return teacher


def build_criterion(args, *, model, teacher, mixup_active: bool):
    if mixup_active:
        base = SoftTargetCrossEntropy()
    elif args.smoothing:
        base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base = torch.nn.CrossEntropyLoss()
    if args.bce_loss:
        base = torch.nn.BCEWithLogitsLoss()
    keep_ratio, num_keep = args.keep_ratio, args.num_keep
    if keep_ratio is None and num_keep is None:
        # MaskedKD by default where the teacher can be masked; DeiT's unmasked loss for a CNN teacher.
        keep_ratio = 0.5 if teacher is not None and find_family(teacher) is not None else 1.0
    mean, std = data_stats(args)
    check_teacher_stats(args, teacher=teacher, data_mean=mean, data_std=std)
    return MaskedDistillationLoss(
        base, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau, student=model,
        keep_ratio=keep_ratio, num_keep=num_keep, mask_mode=args.mask_mode, kd_reduction=args.kd_reduction,
        student_mean=mean, student_std=std, teacher_mean=args.teacher_mean, teacher_std=args.teacher_std,
        teacher_dtype=torch.bfloat16 if args.teacher_bf16 else None, compile_teacher=args.compile_teacher,
        feature_kd=None if getattr(args, "feature_kd", "none") == "none" else args.feature_kd,
        vitkd_alpha=args.vitkd_alpha, vitkd_beta=args.vitkd_beta, vitkd_mask_ratio=args.vitkd_mask_ratio,
        vitkd_layers=tuple(args.vitkd_layers))


def check_teacher_stats(args, *, teacher, data_mean, data_std) -> None:
    """Refuse to guess the input statistics of weights loaded from --teacher-path.

    timm's config for a model name describes timm's own hub weights (``vit_*``: 0.5/0.5), not a file the user trained
    or downloaded elsewhere. When it disagrees with the data pipeline's statistics, either may be right, and the wrong
    one silently costs the teacher accuracy (measured on 1000 val images: 81.8% -> 51.3% for an earlier shipped
    procedural teacher, 99.7% -> 73.8% for the current one): ask.
    """
    if teacher is None or args.distillation_type == "none" or not args.teacher_path:
        return
    if args.teacher_mean is not None or args.teacher_std is not None:
        return
    cfg = model_stats(teacher)
    data = (tuple(float(v) for v in data_mean), tuple(float(v) for v in data_std))
    if cfg is None or not stats_differ(cfg, data):
        return
    fmt = lambda v: " ".join(f"{x:g}" for x in v)
    raise preflight.RunError(
        f"--teacher-model {args.teacher_model}: timm's config says its inputs are normalised with mean {fmt(cfg[0])} "
        f"std {fmt(cfg[1])}, the data pipeline uses mean {fmt(data[0])} std {fmt(data[1])}, and the weights come from "
        f"--teacher-path {args.teacher_path}, whose statistics cannot be read from the file: say which with "
        f"--teacher-mean/--teacher-std (the data's, '--teacher-mean {fmt(data[0])} --teacher-std {fmt(data[1])}', "
        "if the teacher was trained with this pipeline)")


def _checked_criterion(args, **kwargs):
    """build_criterion, with the refusals that concern command-line flags worded in those flags."""
    try:
        criterion = build_criterion(args, **kwargs)
    except CaptureError:
        kind = type(getattr(kwargs["model"], "module", kwargs["model"])).__name__
        raise preflight.RunError(
            f"--model {args.model} ({kind}) has no class-token self-attention for --mask-mode {args.mask_mode} to "
            "read: use a ViT/DeiT --model, or --mask-mode random, or --keep-ratio 1.0") from None
    if not args.train_mode and getattr(criterion, "masking", False) and getattr(criterion, "capture", None) \
            is not None and not criterion.capture.always:
        raise preflight.RunError(
            f"--no-train-mode runs the student in eval mode, where its attention is not read, but --mask-mode "
            f"{args.mask_mode} masks by it: drop --no-train-mode, or pass --mask-mode random or --keep-ratio 1.0")
    return criterion


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
    import random
    random.seed(seed)


# ------------------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    """Train (or evaluate) as DeiT's main.py does; returns the last epoch's log record."""
    with contextlib.ExitStack() as run_scope:  # holds the --output_dir lock until the run ends, however it ends
        return _main(args, run_scope)


def _claim_output_dir(args, run_scope: contextlib.ExitStack) -> None:
    """Rank 0 proves --output_dir writable and locks it before anything is built; every rank learns the answer."""
    error = None
    if args.output_dir and dist_utils.is_main_process():
        try:
            run_scope.enter_context(preflight.OutputDirLock(preflight.check_output_dir(args.output_dir)))
        except preflight.RunError as refusal:
            error = refusal
    preflight.agree_across_ranks(error)


def _cost_stats(cost) -> dict:
    """The per-image GFLOPs logged each epoch (fvcore counts; training = 3x forward)."""
    return {"teacher_gflops_per_img": cost.teacher_per_step, "teacher_gflops_full": cost.teacher_full,
            "student_gflops_train": cost.student_train, "feature_heads_gflops_train": 3.0 * cost.feature_heads}


def _check_resume_config(args, config: dict) -> None:
    """A resume continues the same experiment: other experiment flags are refused unless --resume-anyway says so."""
    resume = find_resume(args.output_dir, args.resume)
    if not resume or args.eval:
        return
    saved = saved_config(resume)
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


def create_student(args) -> torch.nn.Module:
    model = preflight.create_model_checked(
        args.model, flag="--model", kwargs_flag="--model-kwargs", extra=args.model_kwargs, img_size=args.input_size,
        pretrained=False, num_classes=args.nb_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    preflight.check_data_channels(model, flag=f"--model {args.model}", kwargs_flag="--model-kwargs")
    return model


def _main(args, run_scope: contextlib.ExitStack) -> dict:
    config = preflight.experiment_config(args)  # as given: args.lr is rescaled in place below
    check_args(args)
    dist_utils.init_distributed_mode(args)
    device = _resolve_device(args)
    _seed_everything(args)
    cudnn.benchmark = True
    print(args)
    _claim_output_dir(args, run_scope)
    _check_resume_config(args, config)

    requested_classes = args.nb_classes
    dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
    preflight.check_class_count(requested=requested_classes, found=args.nb_classes, data_set=args.data_set)
    dataset_val, _ = build_dataset(is_train=False, args=args)
    loader_train, loader_val, sampler_train = build_loaders(args, dataset_train, dataset_val)
    if not args.eval:
        preflight.check_batches(batch_size=args.batch_size, train_images=len(dataset_train),
                                per_process=len(sampler_train), steps=len(loader_train),
                                world_size=dist_utils.get_world_size())

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)

    print(f"Creating model: {args.model}")
    model = create_student(args)
    if hasattr(model, "set_distilled_training") and args.distillation_type != "none":
        model.set_distilled_training(True)  # timm's DeiT-distilled: (cls, dist) outputs while training
    if args.finetune:
        load_weights(model, args.finetune, strict=False, what="fine-tune checkpoint", drop_mismatched_head=True)
    model.to(device)

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)

    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if args.gpu is not None
                                                          else None)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print("number of params:", n_parameters)

    if not args.unscale_lr:
        args.lr = args.lr * args.batch_size * dist_utils.get_world_size() / 512.0
    optimizer = create_optimizer_v2(model_without_ddp, **optimizer_kwargs(cfg=args))
    loss_scaler = NativeScaler(device=device.type) if args.amp_dtype == "fp16" else None
    lr_scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args))

    teacher = None
    if args.distillation_type != "none":
        print(f"Creating teacher model: {args.teacher_model}")
        teacher = create_teacher(args, args.nb_classes).to(device).eval()
    criterion = _checked_criterion(args, model=model, teacher=teacher, mixup_active=mixup_active)
    print(criterion.describe())
    feature_heads = getattr(criterion, "feature_heads", None)
    if feature_heads is not None:
        # The heads train with the student (same lr/schedule; decay on weights only), outside its EMA and exports.
        for group in criterion.feature_param_groups(args.weight_decay):
            optimizer.add_param_group(group)
        lr_scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args))  # so it sees the new groups
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

    resume = find_resume(args.output_dir, args.resume)
    max_accuracy = 0.0
    if resume:
        if args.eval:
            load_weights(model_without_ddp, resume, strict=True, what="checkpoint to evaluate")
        else:
            schedule = copy.deepcopy(lr_scheduler.state_dict())
            args.start_epoch = load_training_state(resume, model=model_without_ddp, optimizer=optimizer,
                                                   lr_scheduler=lr_scheduler, scaler=loss_scaler,
                                                   model_ema=model_ema, feature_heads=feature_heads)
            if lr_scheduler.state_dict() != schedule:
                # timm schedulers are a function of their settings and the epoch; the command line's settings win,
                # so `--epochs 300` resumed from a run started with `--epochs 100` follows the 300-epoch schedule.
                print("note: the schedule settings differ from the checkpoint's: following the command line")
                lr_scheduler.load_state_dict(schedule)
            max_accuracy = float(read_checkpoint(resume).get("extra", {}).get("max_accuracy", 0.0))
            print(f"Resumed from {resume}: continuing at epoch {args.start_epoch}")

    if args.eval:
        test_stats = evaluate(loader_val, model, device, amp_dtype=args.amp_dtype, reduce=args.dist_eval)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return {f"test_{k}": v for k, v in test_stats.items()}

    recorder = _mask_recorder(args, criterion, teacher)
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    log_stats: dict = {}
    # Epoch e trains at the schedule's value for e (as timm's train.py does). DeiT steps with `epoch` after epoch
    # `epoch`, which repeats epoch 0's lr in epoch 1 (two warm-up epochs at --warmup-lr for --warmup-epochs 1).
    # Setting the start epoch's value here also makes a resumed run continue on the same schedule.
    lr_scheduler.step(args.start_epoch)
    for epoch in range(args.start_epoch, args.epochs):
        sampler_train.set_epoch(epoch) if hasattr(sampler_train, "set_epoch") else None
        epoch_keep = keep_schedule.apply(epoch) if keep_schedule is not None else {}
        if recorder is not None:
            recorder.start_epoch(epoch, is_first=epoch == 0, is_last=epoch == args.epochs - 1)
        train_stats = train_one_epoch(
            model, criterion, loader_train, optimizer, device, epoch, loss_scaler=loss_scaler,
            amp_dtype=args.amp_dtype, max_norm=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn,
            set_training_mode=args.train_mode, bce_loss=args.bce_loss, print_freq=args.print_freq,
            mask_recorder=recorder, max_steps=args.max_steps_per_epoch)
        lr_scheduler.step(epoch + 1)
        if args.skip_bad_images and count_bad_images(args.output_dir):
            print(f"skipped {count_bad_images(args.output_dir)} unreadable image(s) so far (--skip-bad-images), "
                  f"listed in {os.path.join(args.output_dir, BAD_IMAGES_LOG)}")
        if recorder is not None:
            recorder.end_epoch(epoch, is_last=epoch == args.epochs - 1)
        test_stats = evaluate(loader_val, model, device, amp_dtype=args.amp_dtype, reduce=args.dist_eval)
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%  "
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
        if output_dir and dist_utils.is_main_process():
            extra = {"max_accuracy": max_accuracy}
            save_training_state(output_dir / "checkpoint.pth", model=model_without_ddp, optimizer=optimizer,
                                lr_scheduler=lr_scheduler, epoch=epoch, args=args, scaler=loss_scaler,
                                model_ema=model_ema, extra=extra, feature_heads=feature_heads, config=config)
            if test_stats["acc1"] >= max_accuracy:
                save_atomic({"model": model_without_ddp.state_dict(), "epoch": epoch},
                            output_dir / "best_checkpoint.pth")
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
        dist_utils.barrier()
    if args.start_epoch >= args.epochs:  # a finished run found in output_dir: report it instead of retraining
        print(f"Nothing to train: the checkpoint already covers {args.epochs} epochs")
        log_stats = {f"test_{k}": v for k, v in
                     evaluate(loader_val, model, device, amp_dtype=args.amp_dtype, reduce=args.dist_eval).items()}
    total = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    print(f"Training time {total}")
    log_stats["max_accuracy"] = max(max_accuracy, log_stats.get("test_acc1", 0.0))
    if cost is not None:
        log_stats.update(_cost_stats(cost))
    return log_stats


def _mask_recorder(args, criterion, teacher):
    if not args.mask_vis or not getattr(criterion, "masking", False):
        return None
    from maskedkd_app.maskvis import MaskRecorder
    mean, std = data_stats(args)
    return MaskRecorder(args.mask_vis, teacher_grid(teacher), mean=mean, std=std)


# ------------------------------------------------------------------------------------------------------- demo
def run_demo(args, cfg=None) -> dict:
    from maskedkd_app.demo import run_demo as demo
    parser = argparse.ArgumentParser("demo phase", parents=[get_args_parser()])
    return demo(args, main, parser.parse_args, cfg=cfg)


def _one_line(error: BaseException) -> str:
    # A DataLoader worker's exception comes back re-raised with the worker's whole traceback as its message;
    # the last line of it is the message that was raised.
    text = str(error)
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.strip().splitlines()[-1])
    return text


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser("MaskedKD training and evaluation script", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        if args.demo:
            run_demo(args)
        else:
            main(args)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except USER_ERRORS as error:
        if os.environ.get("MASKEDKD_TRACEBACK"):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    finally:
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
