"""Start-up checks of main_maskedkd.py: refuse, before anything trains, a run that would fail late or go wrong silently.

Each check raises ``RunError`` (a ``ValueError``, so the command line prints one line and exits 2) naming the value
that is wrong and the fix. They are cheap: nothing here builds a model or reads a data set.
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

try:  # POSIX only; elsewhere the output directory is not locked (said once at start-up)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".maskedkd.lock"


class RunError(ValueError):
    """A run-level precondition does not hold: output directory, concurrent run, sizes, model names."""


# ------------------------------------------------------------------------------------------ output directory


def _probe_write(directory: Path) -> None:
    # A real write, not os.access: access() says yes to root on a read-only mount and knows nothing of quotas.
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test.", delete=True) as handle:
        handle.write(b"ok")
        handle.flush()


def check_output_dir(path: str, *, flag: str = "--output_dir") -> Path:
    """Create ``path`` if needed and prove a file can be written there; RunError naming ``flag`` and the path."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise RunError(f"{flag} {path} is a file, not a directory: pass a directory path (it is created if "
                       "missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunError(f"{flag} {path} cannot be created: part of that path is a file; pass a path whose "
                       "parents are directories") from None
    except OSError as error:
        raise RunError(f"{flag} {path} cannot be created ({error.strerror or error}); pass a writable "
                       "location") from None
    try:
        _probe_write(directory)
    except OSError as error:
        raise RunError(f"{flag} {path} is not writable ({error.strerror or error}): its files could not be "
                       "saved, so nothing was trained; pass a writable directory") from None
    return directory


def check_output_files(directory: Path, names: Sequence[str], *, flag: str = "--output_dir") -> None:
    """Each file the run will write in ``directory`` can be: not a directory of that name, not a read-only file.

    Checkpoints are replaced by rename (the directory's write permission, proven by ``check_output_dir``); the log
    is appended to, so an existing file must open for appending (opened, nothing written).
    """
    for name in names:
        path = directory / name
        if path.is_dir():
            raise RunError(f"{flag} {directory}: {name} there is a directory, but the run writes a file of that "
                           f"name; move it away or pass another {flag}")
        if path.exists():
            try:
                with open(path, "ab"):
                    pass
            except OSError as error:
                raise RunError(f"{flag} {directory}: {name} cannot be written ({error.strerror or error}); fix its "
                               f"permissions or pass another {flag}") from None


def check_input_files(paths: Mapping[str, str]) -> None:
    """Each ``{flag: path}`` given (not an URL) names an existing file: refused before anything is built."""
    for flag, path in paths.items():
        if not path or str(path).startswith(("https://", "http://")):
            continue
        if os.path.isdir(path):
            raise RunError(f"{flag} {path} is a directory: pass the checkpoint file inside it (e.g. "
                           f"{os.path.join(path, 'checkpoint.pth')})")
        if not os.path.isfile(path):
            raise RunError(f"{flag} {path}: no such file; check the path")


class OutputDirLock:
    """An exclusive ``flock`` on ``<output_dir>/.maskedkd.lock`` for the lifetime of one run.

    The kernel drops a flock when its process exits, however it exits (kill -9 included), so a lock left by a dead
    run is never in force: the next run takes it and overwrites the stale holder line. The file itself is kept;
    deleting it would let a third run lock a fresh inode while the second still holds the old one.
    """

    def __init__(self, directory: os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputDirLock":
        if fcntl is None:
            print(f"note: --output_dir {self.directory} is not locked (no fcntl on this platform)")
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunError(f"--output_dir {self.directory} is in use by another run ({holder}): two runs would "
                           "overwrite each other's checkpoints and log; wait for it to finish or pass another "
                           "--output_dir") from None
        except OSError as error:  # a filesystem without flock support (some network mounts): say so, run on
            os.close(fd)
            print(f"note: --output_dir {self.directory} cannot be locked ({error.strerror or error}): make sure no "
                  "other run uses it")
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def agree_across_ranks(error: Optional[Exception]) -> None:
    """Raise on every rank when any rank refused (rank 0 alone checks the output dir), so none waits forever."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(flag.item()):
        raise RunError("another rank refused to start (rank 0 printed why)")


# --------------------------------------------------------------------------------------------- sizes, epochs


def check_schedule(args: Any) -> None:
    if not args.eval and args.epochs < 1:
        raise RunError(f"--epochs {args.epochs}: training needs at least one epoch; pass --epochs 1 or more "
                       "(or --eval to evaluate only)")


def check_batches(*, batch_size: int, train_images: int, per_process: int, steps: int, world_size: int) -> None:
    """Refuse an epoch without a single full batch: the loader drops the last partial batch, so it would train
    nothing yet write checkpoints and log a loss of 0."""
    if steps > 0:
        return
    where = f", {per_process} per process on {world_size} processes" if world_size > 1 else ""
    raise RunError(f"--batch-size {batch_size} is larger than the training set ({train_images} images{where}): "
                   f"no full batch fits, so an epoch would train nothing; pass --batch-size {max(per_process, 1)} "
                   "or less")


def check_class_count(*, requested: Optional[int], found: int, data_set: str) -> None:
    """A data set with its own classes (folders, CIFAR) decides the count; a different --nb-classes is refused
    rather than ignored, since the user expected a head of that size."""
    if requested is not None and requested != found:
        raise RunError(f"--nb-classes {requested} but --data-set {data_set} has {found} classes: drop --nb-classes "
                       "(the data set's count is used) or point --data-path at the intended data")


# ----------------------------------------------------------------------------------------------- model names


def _registry_name(name: str) -> str:
    return name.split(".", 1)[0]  # 'vit_base_patch16_224.augreg_in21k' -> architecture name


def check_model_name(name: str, *, flag: str) -> None:
    """Refuse a name timm does not know, suggesting the closest registered names."""
    import timm
    if ":" in name or timm.is_model(name):  # hf-hub:/local-dir: sources are resolved by timm itself
        return
    close = difflib.get_close_matches(_registry_name(name), timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
    raise RunError(f"{flag} {name!r} is not a timm model: {hint}")


def _model_class(class_name: str) -> Optional[type]:
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("timm.models") and isinstance(getattr(module, class_name, None), type):
            return getattr(module, class_name)
    return None


def _kwarg_hint(error: TypeError) -> str:
    found = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(error))
    if not found:
        return ""
    cls = _model_class(found.group(1))
    if cls is None:
        return f" ({found.group(2)!r} is not an argument of {found.group(1)})"
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    close = difflib.get_close_matches(found.group(2), accepted, n=3, cutoff=0.5)
    return (f" ({found.group(2)!r} is not an argument of {found.group(1)}"
            + (f"; did you mean {', '.join(close)}?)" if close else ")"))


def create_model_checked(name: str, *, flag: str, kwargs_flag: str, extra: Mapping[str, Any],
                         img_size: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a one-line RunError naming the flag that is wrong, and a close-name hint.

    ``extra`` holds what the user passed through ``kwargs_flag`` (--model-kwargs / --teacher-kwargs) and wins over
    ``kwargs``. ``img_size`` is passed when the model takes it; a CNN (whose constructor has no such argument) is
    built without it, since it takes any input size.
    """
    import timm
    check_model_name(name, flag=flag)
    given = " ".join(f"{k}={v}" for k, v in extra.items()) or "(none given)"
    try:
        if img_size is not None and "img_size" not in extra:
            try:
                return timm.create_model(name, **{**kwargs, "img_size": img_size, **extra})
            except TypeError as error:
                if "'img_size'" not in str(error):
                    raise
        return timm.create_model(name, **{**kwargs, **extra})
    except TypeError as error:
        raise RunError(f"{flag} {name} rejects its arguments{_kwarg_hint(error)}: {error}; fix {kwargs_flag} "
                       f"{given}") from None
    except (ValueError, AssertionError, RuntimeError, KeyError) as error:
        raise RunError(f"{flag} {name} cannot be built with {kwargs_flag} {given} "
                       f"({type(error).__name__}: {error}); fix those values") from None


def check_patch_grid(model: nn.Module, *, input_size: int, flag: str) -> None:
    """A patch model whose patch size does not divide --input-size silently never sees the last rows and columns
    (timm's patch convolution floors the grid); refuse it unless the model pads and sizes its grid to the image
    (dynamic_img_pad=True with dynamic_img_size=True: padding alone fails on the position embedding)."""
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None or (getattr(embed, "dynamic_img_pad", False) and getattr(model, "dynamic_img_size", False)):
        return
    size = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if all(isinstance(p, int) and p > 0 for p in size) and any(input_size % p for p in size):
        step = max(size)
        lower, upper = input_size - input_size % step, input_size - input_size % step + step
        raise RunError(f"--input-size {input_size} is not a multiple of the patch size {step} of {flag}: the last "
                       f"{input_size % step} pixel rows and columns would never be seen; pass --input-size "
                       + (f"{lower} or {upper}" if lower else f"{upper}")
                       + " (or build it with dynamic_img_size=True dynamic_img_pad=True)")


def check_data_channels(model: nn.Module, *, flag: str, kwargs_flag: str, channels: int = 3) -> None:
    """Every data set here yields RGB images: refuse a model built for another channel count before it trains."""
    from deit_patch.layout import input_channels
    expected = input_channels(model)
    if expected is not None and expected != channels:
        raise RunError(f"{flag} takes {expected}-channel images but the data pipeline yields {channels}-channel RGB "
                       f"images: drop in_chans={expected} from {kwargs_flag}")


# ------------------------------------------------------------------------------------- resume configuration

# Flags that change where/how a run is executed or reported, never what it computes: they may differ on resume.
# Everything else is part of the experiment. --epochs may grow (or shrink) to extend a finished run: the resumed
# schedule keeps the checkpoint's own state, so that is not a silent change; it is said at start-up.
NON_EXPERIMENT_FLAGS = frozenset({
    "output_dir", "resume", "resume_anyway", "start_epoch", "eval", "device", "num_workers", "pin_mem",
    "print_freq", "world_size", "dist_url", "dist_eval", "rank", "gpu", "distributed", "dist_backend",
    "local_rank", "mask_vis", "no_flops", "demo", "data_path", "skip_bad_images", "epochs", "plots",
})


def experiment_config(args: Any) -> Dict[str, Any]:
    """Every flag as given on the command line (before any in-place rescaling such as --lr's), as plain values."""
    from maskedkd_app.checkpoint import args_to_dict
    return args_to_dict(args)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """``--flag: checkpoint X, now Y`` for every experiment flag that differs.

    A flag only one side has is skipped: it was added (or removed) by a newer version of the script, and its
    default keeps the old behaviour.
    """
    return [f"--{key.replace('_', '-')}: checkpoint {saved[key]!r}, now {current[key]!r}"
            for key in sorted(set(saved) & set(current))
            if key not in NON_EXPERIMENT_FLAGS and saved[key] != current[key]]
