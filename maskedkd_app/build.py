"""What a training run is made of, built from its arguments: data, student, EMA, optimizer, teacher, criterion.

Each function builds one thing the way DeiT's main.py does, with the checks that turn a bad flag into a clear
refusal (``preflight.RunError`` / ``CheckpointError``) rather than a late traceback or a silently wrong run.
``train.main`` calls them in DeiT's order; the reproduction's analysis and tests call them one at a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Optional, Tuple

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler
from torch.utils.data import DataLoader, Dataset, Sampler

from deit_patch.capture import CaptureError
from deit_patch.teacher_input import model_stats, stats_differ
from deit_patch.layout import patch_grid
from deit_patch.teachers import find_family
from losses import MaskedDistillationLoss

from . import distributed as dist_utils
from . import preflight
from .args import get_args_parser
from .checkpoint import TRAINING_STATE_FORMAT, CheckpointError, extract_state_dict, load_state_checked, read_checkpoint
from .data import build_dataset, build_loaders, data_stats


# ------------------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Data:
    train: Dataset
    val: Dataset
    loader_train: DataLoader
    loader_val: DataLoader
    sampler_train: Sampler


def build_data(args) -> Data:
    """Both splits and their loaders; sets ``args.nb_classes`` to the class count the data set has."""
    requested_classes = args.nb_classes
    dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
    preflight.check_class_count(requested=requested_classes, found=args.nb_classes, data_set=args.data_set)
    dataset_val, _ = build_dataset(is_train=False, args=args)
    loader_train, loader_val, sampler_train = build_loaders(args, dataset_train, dataset_val)
    if not args.eval:
        preflight.check_batches(batch_size=args.batch_size, train_images=len(dataset_train),
                                per_process=len(sampler_train), steps=len(loader_train),
                                world_size=dist_utils.get_world_size())
    return Data(dataset_train, dataset_val, loader_train, loader_val, sampler_train)


def build_mixup(args) -> Optional[Mixup]:
    """timm's Mixup/CutMix when any of them is on (then the targets are soft), else None."""
    if not (args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


# ----------------------------------------------------------------------------------------------------- models
def _family_filter(model: torch.nn.Module):
    """timm's own checkpoint adapter for the model's module (resamples position embeddings, patch kernels)."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None) if module and module.__name__.startswith("timm") else None


def load_weights(model: torch.nn.Module, path: str, *, strict: bool, what: str,
                 drop_mismatched_head: bool = False) -> None:
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
                       fix="Does the model name match the checkpoint's architecture, and the class count the "
                           "dataset's?",
                       may_miss=("head.", "head_dist.", "dist_token") if drop_mismatched_head else ())


def create_student(args) -> torch.nn.Module:
    """The student from ``--model``/``--model-kwargs``, refused unless it takes 3-channel images."""
    model = preflight.create_model_checked(
        args.model, flag="--model", kwargs_flag="--model-kwargs", extra=args.model_kwargs, img_size=args.input_size,
        pretrained=False, num_classes=args.nb_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    preflight.check_data_channels(model, flag=f"--model {args.model}", kwargs_flag="--model-kwargs")
    preflight.check_patch_grid(model, input_size=args.input_size, flag=f"--model {args.model}")
    return model


def build_student(args, device: torch.device) -> torch.nn.Module:
    """The student on ``device``: distilled-token training switched on, ``--finetune`` weights loaded."""
    print(f"Creating model: {args.model}")
    model = create_student(args)
    if hasattr(model, "set_distilled_training") and args.distillation_type != "none":
        model.set_distilled_training(True)  # timm's DeiT-distilled: (cls, dist) outputs while training
    if args.finetune and not args.eval:  # --eval loads its weights whole (train.main): no re-initialised head
        load_weights(model, args.finetune, strict=False, what="fine-tune checkpoint", drop_mismatched_head=True)
    return model.to(device)


def build_ema(args, model: torch.nn.Module) -> Optional[ModelEmaV3]:
    if not args.model_ema:
        return None
    return ModelEmaV3(model, decay=args.model_ema_decay,
                      device=torch.device("cpu") if args.model_ema_force_cpu else None)


def adopt_teacher_checkpoint_args(args) -> None:
    """A ``--teacher-path`` that is one of our own training checkpoints says how its model was built and what its
    input statistics were: take the teacher's name, kwargs and statistics from it where the flags leave them
    unset (a flag that is given wins, and a line says so)."""
    path = args.teacher_path
    if args.distillation_type == "none" or not path or "://" in path or not os.path.isfile(path):
        return
    try:
        state = read_checkpoint(path)
    except CheckpointError:
        return  # load_weights reports what the file is
    saved = state.get("args") if state.get("format") == TRAINING_STATE_FORMAT else None
    if not isinstance(saved, dict) or not saved.get("model"):
        return
    default = get_args_parser().get_default("teacher_model")
    if args.teacher_model == default:
        args.teacher_model = saved["model"]
        print(f"teacher: --teacher-path {path} is a maskedkd training checkpoint of --model {saved['model']}: "
              "building that")
    elif args.teacher_model != saved["model"]:
        print(f"note: --teacher-model {args.teacher_model} given; the checkpoint {path} was trained as "
              f"--model {saved['model']}")
    if not args.teacher_kwargs and saved.get("model_kwargs"):
        args.teacher_kwargs = dict(saved["model_kwargs"])
        print(f"teacher: --teacher-kwargs {' '.join(f'{k}={v}' for k, v in args.teacher_kwargs.items())} from "
              "the checkpoint's own arguments")
    mean, std = data_stats(argparse.Namespace(**saved))
    if args.teacher_mean is None and args.teacher_std is None:
        args.teacher_mean, args.teacher_std = list(mean), list(std)
        print(f"teacher: input statistics from the checkpoint's own data pipeline (mean {_fmt(mean)}, "
              f"std {_fmt(std)})")
    elif (tuple(args.teacher_mean or mean), tuple(args.teacher_std or std)) != (tuple(mean), tuple(std)):
        print(f"note: --teacher-mean/--teacher-std given; the checkpoint was trained with mean {_fmt(mean)} "
              f"std {_fmt(std)}")


def _fmt(values) -> str:
    return " ".join(f"{float(v):g}" for v in values)


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
    preflight.check_patch_grid(teacher, input_size=args.input_size, flag=f"--teacher-model {args.teacher_model}")
    if args.teacher_path:
        load_weights(teacher, args.teacher_path, strict=True, what="teacher checkpoint")
    return teacher


def build_teacher(args, device: torch.device) -> Optional[torch.nn.Module]:
    """The teacher in eval mode on ``device``, or None when nothing is distilled."""
    if args.distillation_type == "none":
        return None
    print(f"Creating teacher model: {args.teacher_model}")
    return create_teacher(args, args.nb_classes).to(device).eval()


# ------------------------------------------------------------------------------------------ optimizer, schedule
def build_optimizer(args, model: torch.nn.Module, device: torch.device) -> Tuple[Any, Any, Optional[NativeScaler]]:
    """``(optimizer, lr_scheduler, loss_scaler)``; scales ``args.lr`` by the global batch / 512 unless --unscale-lr."""
    if not args.unscale_lr:
        args.lr = args.lr * args.batch_size * dist_utils.get_world_size() / 512.0
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    loss_scaler = NativeScaler(device=device.type) if args.amp_dtype == "fp16" else None
    return optimizer, build_scheduler(args, optimizer), loss_scaler


def build_scheduler(args, optimizer):
    lr_scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args))
    return lr_scheduler


def add_feature_heads(args, criterion, optimizer) -> Optional[torch.nn.Module]:
    """The criterion's trainable feature heads (ViTKD), added to ``optimizer``; None when it has none.

    The heads train with the student (same lr/schedule; decay on weights only), outside its EMA and exports. The
    caller rebuilds the scheduler afterwards so that it sees the new groups.
    """
    feature_heads = getattr(criterion, "feature_heads", None)
    if feature_heads is not None:
        for group in criterion.feature_param_groups(args.weight_decay):
            optimizer.add_param_group(group)
    return feature_heads


# -------------------------------------------------------------------------------------------------- criterion
def build_criterion(args, *, model, teacher, mixup_active: bool) -> MaskedDistillationLoss:
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
        vitkd_layers=tuple(args.vitkd_layers), mask_guard=args.mask_guard, guard_fallback=args.guard_fallback,
        probe_every=args.probe_every, probe_images=args.probe_images)


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


def checked_criterion(args, **kwargs) -> MaskedDistillationLoss:
    """build_criterion, with the refusals that concern command-line flags worded in those flags."""
    try:
        criterion = build_criterion(args, **kwargs)
    except CaptureError:
        kind = type(getattr(kwargs["model"], "module", kwargs["model"])).__name__
        raise preflight.RunError(
            f"--model {args.model} ({kind}) has no class-token self-attention for --mask-mode {args.mask_mode} to "
            "read: use a ViT/DeiT --model, or --mask-mode random, or --keep-ratio 1.0") from None
    capture = criterion.masked_teacher.capture if criterion.masked_teacher is not None else None
    if not args.train_mode and capture is not None and not capture.always:
        raise preflight.RunError(
            f"--no-train-mode runs the student in eval mode, where its attention is not read, but --mask-mode "
            f"{args.mask_mode} masks by it: drop --no-train-mode, or pass --mask-mode random or --keep-ratio 1.0")
    return criterion


def build_mask_recorder(args, criterion, teacher):
    """``--mask-vis``: the recorder of kept patches (heat maps, mask grids), or None when off.

    A run that masks nothing (a CNN teacher, keep 1.0, --mask-mode none) would draw nothing: --mask-vis is refused
    there rather than ignored.
    """
    if not args.mask_vis:
        return None
    if not getattr(criterion, "masking", False):
        raise preflight.RunError(f"--mask-vis {args.mask_vis}: this run masks no teacher patches "
                                 f"({criterion.describe().splitlines()[0]}), so there is nothing to draw; drop "
                                 "--mask-vis, or mask (--keep-ratio below 1 with a ViT-family teacher)")
    from .maskvis import MaskRecorder
    mean, std = data_stats(args)
    return MaskRecorder(args.mask_vis, patch_grid(teacher), mean=mean, std=std)
