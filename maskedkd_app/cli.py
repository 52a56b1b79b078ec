"""``python main_maskedkd.py ...``: parse, run training (``train.main``) or the demo, and turn errors into exit codes.

A mistake the user can fix (a bad flag, file, checkpoint or data set) is one line on stderr and exit code 2, no
traceback (``MASKEDKD_TRACEBACK=1`` shows it); a loss that stops being finite is exit code 1. The demo is
dispatched here, above both ``train`` and ``demo``, so that neither imports the other's caller.
"""
from __future__ import annotations

import os
import re
import sys
from typing import List, Optional

from deit_patch.capture import CaptureError
from deit_patch.teacher_input import TeacherInputError
from deit_patch.teachers import UnsupportedTeacherError

from . import demo, train
from . import distributed as dist_utils
from .args import check_demo_args, parse_args
from .checkpoint import CheckpointError
from .data import DataError
from .engine import NonFiniteLossError

# OSError: files, disks and network are the environment's, and their message names the path (disk full on log.txt).
USER_ERRORS = (CheckpointError, DataError, UnsupportedTeacherError, CaptureError, TeacherInputError, ValueError,
               OSError)


def _one_line(error: BaseException) -> str:
    # A DataLoader worker's exception comes back re-raised with the worker's whole traceback as its message;
    # the last line of it is the message that was raised.
    text = str(error)
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.strip().splitlines()[-1])
    return text


def _what_survives(args) -> str:
    # Checkpoints are written atomically after each epoch, so the last one is whole whenever the run stopped.
    if args.demo or not args.output_dir:
        return "nothing of this run was saved (no --output_dir)" if not args.demo else "rerun --demo to start over"
    path = os.path.join(args.output_dir, "checkpoint.pth")
    if not os.path.isfile(path):
        return f"no epoch had finished, so {args.output_dir} holds no checkpoint; rerun to start over"
    return f"{path} holds the last finished epoch, intact; rerun the same command to resume from it"


def cli(argv: Optional[List[str]] = None) -> int:
    """The exit code of one ``main_maskedkd.py`` call with ``argv`` (``sys.argv[1:]`` when None)."""
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --help (0), or a usage error already printed as one line (2)
        return done.code if isinstance(done.code, int) else 2
    try:
        if args.demo:
            check_demo_args(args)
            demo.run_demo(args)
        else:
            train.main(args)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: say what survives instead of a traceback through the training loop
        print(f"error: interrupted: {_what_survives(args)}", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if os.environ.get("MASKEDKD_TRACEBACK"):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    finally:
        dist_utils.cleanup()
    return 0
