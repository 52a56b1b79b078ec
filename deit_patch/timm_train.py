"""Run timm's own ``train.py``, unmodified, with MaskedKD's teacher masking.

    python -m deit_patch.timm_train --timm-train PATH/TO/pytorch-image-models/train.py <train.py's flags> \\
        --kd-model-name vit_base_patch16_224 --keep-ratio 0.5 [--num-keep N] [--mask-mode M] [--kd-checkpoint FILE]

The masking flags are taken off the command line; everything else goes to ``train.py``. ``train.py`` picks its
distillation task by name (``from timm.task import LogitDistillationTask, TokenDistillationTask``), so those two
names in ``timm.task`` are pointed at the masked tasks (``deit_patch.timm_task``) configured with the flags, and
``train.py`` then runs as a script (``runpy``). Works under ``torchrun ... -m deit_patch.timm_train``.
"""
from __future__ import annotations

import argparse
import os
import re
import runpy
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .argtypes import KeywordArgs, OneLineParser, keep_fraction, positive_int
from .capture import CaptureError
from .masking import MASK_MODES, resolve_num_keep
from .teacher_input import TeacherInputError
from .teachers import UnsupportedTeacherError
from .timm_task import MASKED_TASKS, TeacherWeightsUnavailable, TimmTaskUnavailable, configured, timm_task_base

OUR_FLAGS = ("--timm-train", "--keep-ratio", "--num-keep", "--mask-mode", "--kd-checkpoint", "--kd-model-kwargs",
             "--no-flops")


class TimmTrainError(RuntimeError):
    """The command line or the train.py cannot work with the masked tasks."""


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix of one of train.py's flags must never be taken for ours.
    parser = OneLineParser(
        prog="python -m deit_patch.timm_train", add_help=False, allow_abbrev=False,
        description="timm's train.py with MaskedKD: the KD teacher sees only the patches the student attends to. "
                    "All other flags go to train.py (--kd-model-name selects distillation there).")
    parser.add_argument("--timm-train", required=True, metavar="PATH",
                        help="timm's train.py (from a pytorch-image-models checkout matching the installed timm)")
    parser.error_prefix = "deit_patch.timm_train: "
    parser.add_argument("--keep-ratio", type=keep_fraction, default=None,
                        help="fraction of teacher patches kept (default 0.5 with a teacher a masked family "
                             "describes, 1.0 (unmasked) with any other)")
    parser.add_argument("--num-keep", type=positive_int, default=None, help="absolute teacher patch count instead")
    parser.add_argument("--mask-mode", default=None, choices=sorted(MASK_MODES) + ["none"],
                        help="how patches are chosen (default attention: the student's class-token attention)")
    parser.add_argument("--kd-checkpoint", default=None, metavar="FILE",
                        help="local weights for the --kd-model-name teacher (.pth/.safetensors with its classifier "
                             "for your classes); without it timm downloads the pretrained teacher")
    parser.add_argument("--kd-model-kwargs", nargs="*", default={}, action=KeywordArgs, metavar="K=V",
                        help="extra timm.create_model arguments for the teacher, e.g. img_size=160 (train.py builds "
                             "it by name at its own resolution) or dynamic_img_size=True")
    parser.add_argument("--no-flops", action="store_true", help="skip the fvcore supervision-cost table at start-up")
    return parser


def split_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """(our options, train.py's arguments)."""
    parser = build_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        print("\n--- train.py's own flags follow ---\n", flush=True)
        if not any(a == "--timm-train" or a.startswith("--timm-train=") for a in argv):
            raise SystemExit(0)
    ours, rest = parser.parse_known_args(list(argv))
    return ours, rest


def check_train_script(path: str) -> str:
    """The train.py source, after checking it is a timm train.py that builds tasks through ``timm.task``."""
    if not os.path.isfile(path):
        raise TimmTrainError(f"--timm-train {path!r} is not a file: pass the train.py of a pytorch-image-models "
                             "checkout (git clone https://github.com/huggingface/pytorch-image-models)")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    if "timm.task" not in source or "LogitDistillationTask" not in source:
        raise TimmTrainError(
            f"{path} does not build its distillation task through timm.task.LogitDistillationTask, so the masked "
            "task cannot be put in its place: use the train.py of timm >= 1.0.23 (matching the installed timm)")
    taken = [flag for flag in OUR_FLAGS if f"'{flag}'" in source or f'"{flag}"' in source]
    if taken:
        raise TimmTrainError(f"{path} defines {', '.join(taken)} itself, which this wrapper also reads: the two "
                             "would clash; edit train.py by hand instead (README, 'With timm's train.py')")
    return source


# Our flags that act on the KD teacher alone, as (flag, dest, value meaning "not given").
TEACHER_FLAGS = (("--keep-ratio", "keep_ratio", None), ("--num-keep", "num_keep", None),
                 ("--mask-mode", "mask_mode", None), ("--kd-checkpoint", "kd_checkpoint", None),
                 ("--kd-model-kwargs", "kd_model_kwargs", {}))


def _given_teacher_flags(ours: argparse.Namespace) -> List[str]:
    return [flag for flag, dest, unset in TEACHER_FLAGS if getattr(ours, dest) is not None
            and getattr(ours, dest) != unset]


def train_py_args(train_py: str, rest: Sequence[str]) -> Optional[argparse.Namespace]:
    """train.py's own reading of its flags (its parser, and its --config YAML), without running its main().

    timm's train.py builds its parser at import and trains only under ``if __name__ == '__main__'``, so executing it
    under another name and calling its ``_parse_args`` reads the flags exactly as the run will. A script without
    that guard would train on import: None (the caller then reads the command line itself). train.py's refusal of
    its own flags (SystemExit) passes through: it is the same refusal the run would give, only earlier.
    """
    with open(train_py, encoding="utf-8") as f:
        source = f.read()
    if not re.search(r"""if\s+__name__\s*==\s*['"]__main__['"]""", source):
        return None
    saved_argv, saved_path = list(sys.argv), list(sys.path)
    sys.argv = [train_py] + list(rest)
    sys.path.insert(0, os.path.dirname(train_py))
    try:
        namespace = runpy.run_path(train_py, run_name="__maskedkd_flags__")
        parse = namespace.get("_parse_args")
        if callable(parse):
            parsed = parse()
            return parsed[0] if isinstance(parsed, tuple) else parsed
        parser = namespace.get("parser")
        return parser.parse_known_args(list(rest))[0] if isinstance(parser, argparse.ArgumentParser) else None
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001 - the script cannot be read this way; the run itself will say what is wrong
        return None
    finally:
        sys.argv, sys.path = saved_argv, saved_path


def _kd_model_name(train_args: Optional[argparse.Namespace], rest: Sequence[str]) -> Optional[str]:
    if train_args is not None:
        return getattr(train_args, "kd_model_name", None)
    for i, arg in enumerate(rest):  # no parser to ask: the flag as written
        if arg.startswith("--kd-model-name="):
            return arg.split("=", 1)[1]
        if arg == "--kd-model-name" and i + 1 < len(rest):
            return rest[i + 1]
    return None


def check_before_run(ours: argparse.Namespace, rest: Sequence[str], train_py: str) -> None:
    """Refuse, before train.py builds anything, what would be ignored or fail only once it had: masking flags on a
    run that distils nothing (or distils features, which are not masked), and a keep setting the teacher's patch
    grid cannot take (0, more patches than it has, --keep-ratio and --num-keep disagreeing)."""
    given = _given_teacher_flags(ours)
    train_args = train_py_args(train_py, rest)
    teacher = _kd_model_name(train_args, rest)
    if given and teacher is None:
        raise TimmTrainError(f"{', '.join(given)} {'configures' if len(given) == 1 else 'configure'} the KD teacher, "
                             "but train.py distils nothing here (no --kd-model-name): add --kd-model-name TEACHER, "
                             "or drop " + ", ".join(given))
    kind = getattr(train_args, "kd_distill_type", "logit") if train_args is not None else "logit"
    masking_flags = [flag for flag in given if flag in ("--keep-ratio", "--num-keep", "--mask-mode")]
    if masking_flags and kind == "feature":
        raise TimmTrainError(f"{', '.join(masking_flags)}: --kd-distill-type feature distils the teacher's features "
                             "unmasked (only logit and token distillation are masked); use --kd-distill-type logit "
                             "or token, or drop " + ", ".join(masking_flags))
    if ours.mask_mode == "none" and (ours.num_keep is not None or ours.keep_ratio not in (None, 1.0)):
        raise TimmTrainError("--mask-mode none runs the whole teacher, so --keep-ratio/--num-keep would be ignored: "
                             "drop one or the other")
    if teacher is not None and (ours.keep_ratio is not None or ours.num_keep is not None) \
            and ours.mask_mode != "none":
        _check_keep_fits(teacher, ours)


def _check_keep_fits(name: str, ours: argparse.Namespace) -> None:
    """The keep setting against the teacher's patch grid, read from the teacher built on the meta device."""
    import torch
    from timm import create_model, is_model
    from . import layout
    from .teachers import find_family, unmaskable_reason
    if not is_model(name):
        return  # a name train.py resolves some other way (hf-hub:, a local folder): checked when it is built
    try:
        with torch.device("meta"):  # shapes only: no weights allocated, nothing downloaded
            teacher = create_model(name, pretrained=False, **ours.kd_model_kwargs)
    except Exception:  # noqa: BLE001 - train.py will build it and say what is wrong in its own words
        return
    flags = " ".join(f"{flag} {value}" for flag, value in (("--keep-ratio", ours.keep_ratio),
                                                           ("--num-keep", ours.num_keep)) if value is not None)
    if find_family(teacher) is None:
        if ours.num_keep is not None or ours.keep_ratio != 1.0:
            raise TimmTrainError(f"{flags}: the KD teacher {name} ({type(teacher).__name__}) cannot be masked "
                                 f"({unmaskable_reason(teacher)}); it distils unmasked, so drop the flag")
        return
    patches = layout.num_patches(teacher)
    if patches is None or (ours.num_keep is not None and layout.is_dynamic_size(teacher) and ours.keep_ratio is None):
        return  # a size-following teacher's patch count is the batch's: checked per batch
    try:
        resolve_num_keep(num_patches=patches, keep_ratio=ours.keep_ratio, num_keep=ours.num_keep)
    except ValueError as error:
        raise TimmTrainError(f"{flags} does not fit the KD teacher {name} ({patches} patches): {error}") from None


def task_defaults(ours: argparse.Namespace) -> Dict[str, object]:
    """Constructor defaults for the masked tasks from our flags (only what was given)."""
    defaults: Dict[str, object] = {}
    if ours.keep_ratio is not None:
        defaults["keep_ratio"] = ours.keep_ratio
    if ours.num_keep is not None:
        defaults["num_keep"] = ours.num_keep
    if ours.mask_mode is not None:
        defaults["mask_mode"] = ours.mask_mode
    if ours.kd_checkpoint is not None:
        if not os.path.isfile(ours.kd_checkpoint):
            raise TimmTrainError(f"--kd-checkpoint {ours.kd_checkpoint!r} is not a file")
        defaults["teacher_pretrained_path"] = os.path.abspath(ours.kd_checkpoint)
    defaults["log_supervision_cost"] = not ours.no_flops
    return defaults


def build_named_teacher(masked: type, args: tuple, kwargs: Dict[str, object],
                        model_kwargs: Dict[str, object]) -> Tuple[tuple, Dict[str, object]]:
    """(args, kwargs) for ``masked`` with a teacher given by name built here, with ``model_kwargs``.

    timm's DistillationTeacher builds a named teacher without extra arguments; this builds it the same way
    (pretrained, a local file through the pretrained config, the student's classes and channels) plus them.
    """
    from timm.models import create_model
    from .layout import unwrap_model
    from .timm_task import bind_task_args, weights_error
    bound = bind_task_args(masked, args, kwargs)
    name = bound.get("teacher_model")
    if not isinstance(name, str):
        return args, kwargs
    student = unwrap_model(bound["student_model"])
    num_classes = getattr(student, "num_classes", None)
    path = bound.get("teacher_pretrained_path") or masked.task_defaults.get("teacher_pretrained_path")
    overlay = dict(bound.get("teacher_pretrained_cfg_overlay") or {})
    if path:
        overlay = {"file": path, "num_classes": num_classes, **overlay}
    try:
        teacher = create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, num_classes=num_classes,
                               in_chans=getattr(student, "in_chans", 3), **model_kwargs)
    except OSError as err:
        raise weights_error(name, path, err) from err
    # timm leaves a teacher module where it is: put it where the task's tensors live.
    teacher.to(device=bound.get("device") or "cpu", dtype=bound.get("dtype"))
    bound["teacher_model"] = teacher
    return (), dict(bound)  # every argument by name: the constructor has no positional-only ones


def install_tasks(defaults: Dict[str, object], built: List[str],
                  teacher_kwargs: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """Point ``timm.task``'s task names at configured masked tasks; returns the originals (to restore)."""
    import timm.task as timm_task
    originals: Dict[str, object] = {}
    for base_name, task in MASKED_TASKS.items():
        if not hasattr(timm_task, base_name):
            continue  # TokenDistillationTask arrived in timm 1.0.25; train.py of 1.0.23/24 does not ask for it
        originals[base_name] = getattr(timm_task, base_name)
        setattr(timm_task, base_name, _tracked(configured(task, **defaults), built, teacher_kwargs))
    return originals


def _tracked(masked: type, built: List[str], teacher_kwargs: Optional[Dict[str, object]]) -> type:
    """``masked``, building a named teacher with ``teacher_kwargs`` and noting in ``built`` each task made."""

    class Tracked(masked):
        def __init__(self, *args, **kwargs):
            if teacher_kwargs:
                args, kwargs = build_named_teacher(masked, args, kwargs, teacher_kwargs)
            super().__init__(*args, **kwargs)
            built.append(type(self).__name__)

    Tracked.__name__ = Tracked.__qualname__ = masked.__name__
    return Tracked


def run(argv: Optional[Sequence[str]] = None) -> None:
    timm_task_base("LogitDistillationTask")  # first: on a timm without timm.task, say which timm is needed
    ours, rest = split_args(sys.argv[1:] if argv is None else argv)
    train_py = os.path.abspath(ours.timm_train)
    check_train_script(train_py)
    defaults = task_defaults(ours)
    check_before_run(ours, rest, train_py)
    built: List[str] = []
    originals = install_tasks(defaults, built, teacher_kwargs=ours.kd_model_kwargs)
    import timm.task as timm_task
    saved_argv, saved_path = list(sys.argv), list(sys.path)
    sys.argv = [train_py] + list(rest)
    sys.path.insert(0, os.path.dirname(train_py))  # as `python train.py` would: its folder first
    try:
        runpy.run_path(train_py, run_name="__main__")
    finally:
        for base_name, original in originals.items():
            setattr(timm_task, base_name, original)
        sys.argv, sys.path = saved_argv, saved_path
    if any(a == "--kd-model-name" or a.startswith("--kd-model-name=") for a in rest) and not built:
        print("deit_patch.timm_train: warning: train.py trained without building a masked task (feature "
              "distillation, --kd-distill-type feature, is not masked; or this train.py builds its task another "
              "way), so no teacher patches were masked", file=sys.stderr)


def main() -> None:
    try:
        run()
    except (TimmTrainError, TimmTaskUnavailable, TeacherWeightsUnavailable, TeacherInputError,
            UnsupportedTeacherError, CaptureError) as err:
        # ours, each naming its fix: the message, not a traceback through train.py
        hint = ""
        if isinstance(err, TeacherInputError) and "img_size" in str(err):
            hint = " (here: --kd-model-kwargs img_size=N, or --kd-model-kwargs dynamic_img_size=True)"
        print(f"deit_patch.timm_train: error: {err}{hint}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
