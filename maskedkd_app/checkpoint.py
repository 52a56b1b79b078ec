"""Read teacher weights and save/restore training state, loading only what ``weights_only=True`` accepts.

Every checkpoint this module writes holds nothing but tensors, plain Python values and containers of them, so it
can be read back without unpickling code. Every checkpoint it reads goes through ``weights_only=True`` (or
safetensors), and every failure surfaces as a ``CheckpointError`` that names the problem and the fix.
"""
from __future__ import annotations

import argparse
import errno
import inspect
import os
import pickle
import random
import re
import struct
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from deit_patch.layout import unwrap_model

from . import filekinds

PathLike = Union[str, "os.PathLike[str]"]

# Marks a file written by save_training_state, so a resume from a weights-only file gets a clear message.
TRAINING_STATE_FORMAT = "maskedkd-training-state"
TRAINING_STATE_VERSION = 1

# Wrapper prefixes that DDP and torch.compile add to every key; a teacher saved from a wrapped model has them.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where DeiT/timm/other trainers keep the weights inside a checkpoint, best first: the live model beats its EMA.
_STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "ema")
# How many keys each error lists before "... and N more"; enough to spot a pattern, short enough to read.
_MAX_LISTED = 5


class CheckpointError(ValueError):
    """A checkpoint cannot be read, does not fit the model, or cannot be written safely."""


# ----------------------------------------------------------------------------------------------------- writing


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync it, then rename it over ``path``.

    A crash or a failing pickle mid-write leaves the previous checkpoint intact: ``os.replace`` within one
    directory is atomic on POSIX, and the temp file is removed on any failure.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"cannot save checkpoint {path}: directory {directory} does not exist; create it or fix --output-dir")
    try:
        _write_then_rename(obj, path, directory)
    except (OSError, RuntimeError) as error:
        cause = _os_error(error)
        if cause is None:
            raise
        # Disk full, quota, read-only remount: the previous checkpoint is still whole (the rename never happened).
        kept = "the previous checkpoint is intact" if os.path.isfile(path) else "no earlier checkpoint existed"
        raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause} ({kept}); free space or "
                              "pass a writable --output_dir, then rerun to resume") from None
    _fsync_directory(directory)


def _os_error(error: BaseException) -> Optional[OSError]:
    # torch.save turns a failing buffered write (ENOSPC) into a RuntimeError whose context is the OSError.
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _write_then_rename(obj: Any, path: str, directory: str) -> None:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                     delete=False) as handle:
        tmp_path = handle.name
        try:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            os.unlink(tmp_path)
            raise
    try:
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable across a power cut; not every OS/filesystem allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------- reading


# A truncated zip, an empty file or a non-checkpoint file surfaces as any of these, depending on the byte where the
# zip reader or the (legacy-format) unpickler gives up.
_CORRUPT_ERRORS = (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, IndexError, ValueError, struct.error,
                   SafetensorError)


def _is_url(path_or_url: str) -> bool:
    return path_or_url.startswith(("https://", "http://"))


def read_checkpoint(path_or_url: PathLike, *, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint from a local torch.save/safetensors file or an http(s) URL, refusing pickled code.

    A local file's format is read from its content (``filekinds.sniff``), not its name: a safetensors file named
    ``.pth`` loads, and a file that is no checkpoint (a log, a Git LFS pointer, a numpy array) is named as what it is.
    """
    source = os.fspath(path_or_url)
    if not _is_url(source) and not os.path.isfile(source):
        raise CheckpointError(f"checkpoint not found: {source}; check the path given to --teacher-path / --resume")
    try:
        if _is_url(source):
            return _as_dict(_read_url(source, map_location=map_location), source)
        kind = filekinds.sniff(source)
        if kind.name in ("empty", "zip-broken"):
            raise CheckpointError(f"corrupt or truncated checkpoint: {source} ({kind.description}); re-download or "
                                  "re-copy it, or resume from an earlier checkpoint")
        if not kind.is_checkpoint:
            raise CheckpointError(f"cannot load {source}: it is {kind.description}. Pass a checkpoint written by "
                                  "torch.save (.pth) or a .safetensors file")
        if kind.name == "safetensors":
            return load_safetensors(source, device=_safetensors_device(map_location))
        return _as_dict(torch.load(source, map_location=map_location, weights_only=True), source)
    except pickle.UnpicklingError as error:
        # weights_only's refusal of a global (a class, a function) is pickled code; any other unpickling failure
        # in a file that starts like a torch checkpoint is damage.
        if re.search(r"Unsupported global|GLOBAL \S+ was not an allowed global", str(error)):
            raise _pickled_code_error(source, error) from None
        raise _corrupt_error(source, error) from None
    except _CORRUPT_ERRORS as error:
        if isinstance(error, CheckpointError):
            raise
        raise _corrupt_error(source, error) from None
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.EIO):  # a short file read past its end on some readers
            raise _corrupt_error(source, error) from None
        raise CheckpointError(f"cannot read checkpoint {source}: {error}") from None


def _as_dict(loaded: Any, source: str) -> Dict[str, Any]:
    """A checkpoint is a dict; say what else was saved (a bare tensor, a list, a whole pickled module)."""
    if isinstance(loaded, Mapping):
        return loaded
    what = (f"a single tensor of shape {tuple(loaded.shape)}" if isinstance(loaded, torch.Tensor)
            else f"a {type(loaded).__name__}")
    raise CheckpointError(f"{source} holds {what}, not a dict of tensors: save a state dict, "
                          "torch.save({'model': model.state_dict()}, path), or a .safetensors file")


def _read_url(url: str, *, map_location: Any) -> Dict[str, Any]:
    # weights_only is a keyword of load_state_dict_from_url only on newer torch; ask for it whenever it exists.
    kwargs: Dict[str, Any] = {"map_location": map_location, "check_hash": False}
    if _accepts_keyword(torch.hub.load_state_dict_from_url, "weights_only"):
        kwargs["weights_only"] = True
    return torch.hub.load_state_dict_from_url(url, **kwargs)


def _accepts_keyword(function: Any, name: str) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _safetensors_device(map_location: Any) -> str:
    # safetensors takes a device string only; a callable/dict map_location has no equivalent, so read to CPU.
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    return "cpu"


def _pickled_code_error(source: str, error: Exception) -> CheckpointError:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    culprit = f" (it references {found.group(1)})" if found else ""
    return CheckpointError(
        f"checkpoint {source} contains pickled code/objects{culprit} and was refused for safety: only tensors and "
        "plain values are loaded. Fix: re-save it with only tensors, e.g. torch.save({'model': model.state_dict()}, "
        "path), or as .safetensors. If you trust its source you can convert it yourself with "
        "torch.load(path, weights_only=False) and re-save the state_dict.")


def _corrupt_error(source: str, error: Exception) -> CheckpointError:
    detail = f"{type(error).__name__}: {str(error).split('. ')[0]}".rstrip(": ")
    return CheckpointError(
        f"corrupt or truncated checkpoint: {source} ({detail}); re-download or re-copy it, or resume from an "
        "earlier checkpoint")


# ------------------------------------------------------------------------------------------------ state dicts


def extract_state_dict(ckpt: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights inside a DeiT/timm checkpoint or a plain state dict, with wrapper prefixes stripped."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"checkpoint is a {type(ckpt).__name__}, not a dict; save a state_dict or {{'model': state_dict}}")
    state = ckpt
    for key in _STATE_DICT_KEYS:
        if isinstance(ckpt.get(key), Mapping):
            state = ckpt[key]
            break
    _check_all_tensors(state, top_level=list(ckpt.keys()))
    return {_strip_wrapper_prefixes(key): value for key, value in state.items()}


def _check_all_tensors(state: Mapping[str, Any], *, top_level: List[str]) -> None:
    bad = [key for key, value in state.items() if not (isinstance(key, str) and isinstance(value, torch.Tensor))]
    if bad or not state:
        example = f"{bad[0]!r} is a {type(state[bad[0]]).__name__}" if bad else "it is empty"
        raise CheckpointError(
            f"checkpoint holds no state dict of tensors ({example}; top-level keys: {_summarise(top_level)}). "
            f"Expected a plain state_dict or one under one of {list(_STATE_DICT_KEYS)}")


def _strip_wrapper_prefixes(key: str) -> str:
    # Repeat because wrappers nest (DDP around a compiled model gives 'module._orig_mod.').
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _summarise(keys: List[Any]) -> str:
    shown = ", ".join(str(key) for key in keys[:_MAX_LISTED])
    extra = len(keys) - _MAX_LISTED
    return f"{shown}, ... and {extra} more" if extra > 0 else shown


def _shape_mismatches(module: nn.Module, state: Mapping[str, torch.Tensor]) -> List[str]:
    expected = module.state_dict()
    return [f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
            for key, value in state.items() if key in expected and value.shape != expected[key].shape]


def load_state_checked(module: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool, source: str,
               what: str, fix: str, may_miss: Sequence[str] = ()) -> None:
    """``load_state_dict`` with every key/shape problem collected into one readable CheckpointError.

    ``strict=False`` still verifies that the checkpoint is this architecture: keys the model has but the
    checkpoint lacks are refused unless they start with one of ``may_miss`` (the head a fine-tune re-initialises),
    and a checkpoint sharing no key with the model is refused outright; keys only the checkpoint has are listed.
    """
    expected = module.state_dict().keys()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if not strict:
        if not any(key in state for key in expected):
            raise CheckpointError(f"{what} from {source} shares no parameter name with {type(module).__name__} "
                                  f"(checkpoint keys: {_summarise(list(state.keys()))}): it is another "
                                  f"architecture, nothing would load. {fix}")
        if unexpected:
            print(f"note: {what} from {source}: {len(unexpected)} tensors not used by the model "
                  f"({_summarise(unexpected)})")
        missing = [key for key in missing if not key.startswith(tuple(may_miss))] if may_miss else []
        unexpected = []
    # Shapes are compared first because load_state_dict reports them as a long RuntimeError even when not strict.
    mismatched = _shape_mismatches(module, state)
    if missing or unexpected or mismatched:
        problems = [f"{label}: {_summarise(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                    if keys]
        raise CheckpointError(f"{what} from {source} does not fit {type(module).__name__}: "
                              f"{'; '.join(problems)}. {fix}")
    module.load_state_dict(state, strict=strict)


def load_teacher(model: nn.Module, path_or_url: PathLike, *, strict: bool = True) -> None:
    """Load teacher weights (DeiT/timm format, plain, prefixed, or safetensors) into ``model``."""
    source = os.fspath(path_or_url)
    state = extract_state_dict(read_checkpoint(source))
    load_state_checked(unwrap_model(model), state, strict=strict, source=source, what="teacher checkpoint",
               fix="Does --teacher-model match the checkpoint's architecture? Does --nb-classes / the dataset's "
                   "class count match the classes the teacher was trained on?")


# --------------------------------------------------------------------------------------------- training state


def save_training_state(path: PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        lr_scheduler: Any, epoch: int, args: Any, scaler: Any = None, model_ema: Any = None,
                        extra: Optional[Mapping[str, Any]] = None, config: Optional[Mapping[str, Any]] = None,
                        feature_heads: Optional[nn.Module] = None,
                        rng_states: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
    """Atomically save everything needed to resume, in a form ``torch.load(weights_only=True)`` accepts.

    ``epoch`` is the epoch just finished; ``load_training_state`` returns ``epoch + 1``. ``config`` is the run's
    experiment configuration as given (``args`` is the live namespace, rescaled in place), read back on resume by
    ``saved_config`` so that a resume with other flags is refused instead of silently mixing two experiments.
    ``rng_states`` are every rank's RNG states (``gather_rng_states``, rank order) in a multi-process run, so that
    each rank resumes its own streams; without them only this process's state is stored.
    """
    state: Dict[str, Any] = {
        "format": TRAINING_STATE_FORMAT,
        "version": TRAINING_STATE_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": int(epoch),
        "args": args_to_dict(args),
        "rng": capture_rng_state(),
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if model_ema is not None:
        state["model_ema"] = _ema_module(model_ema).state_dict()
    if extra is not None:
        state["extra"] = dict(extra)
    if feature_heads is not None:  # trainable distillation heads (ViTKD): not student weights, but training state
        state["feature_heads"] = feature_heads.state_dict()
    if config is not None:
        state["config"] = args_to_dict(config)
    if rng_states is not None:
        state["rng_per_rank"] = [dict(rank_state) for rank_state in rng_states]
    # Refuse before writing: an object that only pickles with code would make the resume fail, not the save.
    _check_weights_only_safe(state, where="training state")
    save_atomic(state, path)


def load_training_state(path: PathLike, *, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                        lr_scheduler: Any = None, scaler: Any = None, model_ema: Any = None,
                        restore_rng: bool = True, feature_heads: Optional[nn.Module] = None) -> int:
    """Restore what ``save_training_state`` wrote into the objects given; returns the epoch to start at."""
    source = os.fspath(path)
    state = read_checkpoint(source)
    require_training_state(state, source=source)
    fix = "Resume with the same --model / --nb-classes the checkpoint was trained with."
    load_state_checked(unwrap_model(model), extract_state_dict(state), strict=True, source=source, what="model state",
               fix=fix)
    for name, target in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
        if target is not None:
            _require_key(state, name, source=source)
            target.load_state_dict(state[name])
    # A missing scaler is harmless (an fp32 run resumed with AMP): a fresh scaler re-calibrates in a few steps.
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if model_ema is not None:
        # A fresh EMA would hold the pre-resume random init, silently ruining EMA evaluation, so insist on it.
        _require_key(state, "model_ema", source=source)
        load_state_checked(_ema_module(model_ema), state["model_ema"], strict=True, source=source, what="EMA state",
                   fix=fix)
    if feature_heads is not None:
        # Fresh heads would silently restart feature distillation from random aligners/generator, so insist.
        _require_key(state, "feature_heads", source=source)
        load_state_checked(feature_heads, state["feature_heads"], strict=True, source=source,
                           what="feature-distillation heads", fix="Resume with the same --feature-kd/--vitkd-layers "
                           "and the same student/teacher widths the checkpoint was trained with.")
    if restore_rng:
        restore_rank_rng(state, source=source)
    return int(state["epoch"]) + 1


def saved_config(path: PathLike) -> Optional[Dict[str, Any]]:
    """The experiment configuration a training-state checkpoint was written with (None for older checkpoints)."""
    config = read_checkpoint(path).get("config")
    return dict(config) if isinstance(config, Mapping) else None


def require_training_state(state: Mapping[str, Any], *, source: str) -> None:
    if state.get("format") != TRAINING_STATE_FORMAT or "epoch" not in state:
        raise CheckpointError(
            f"{source} is not a maskedkd training-state checkpoint (no format marker/epoch; keys: "
            f"{_summarise(list(state.keys()))}). Resume only from <output_dir>/checkpoint.pth written by this "
            "trainer; to start from weights alone, pass them as a teacher/fine-tune checkpoint instead")


# What to do when a training state lacks a part the run would restore. EMA is on by default, so "drop
# --model-ema" (the old advice) changed nothing: the flag that turns it off is --no-model-ema.
MISSING_PART_FIX = {
    "model_ema": "pass --no-model-ema to resume without EMA (it is on by default), or start a fresh run",
    "feature_heads": "resume with the --feature-kd the checkpoint was trained with, or start a fresh run",
}


def _require_key(state: Mapping[str, Any], key: str, *, source: str) -> None:
    if key not in state:
        raise CheckpointError(f"training state {source} has no '{key}' entry, so it cannot be restored; "
                              + MISSING_PART_FIX.get(key, "start a fresh run"))


def _ema_module(model_ema: Any) -> nn.Module:
    # timm ModelEmaV2/V3 keep the averaged copy at `.module`, the older ModelEma at `.ema`; a bare module is itself.
    for attribute in ("module", "ema"):
        inner = getattr(model_ema, attribute, None)
        if isinstance(inner, nn.Module):
            return unwrap_model(inner)
    if isinstance(model_ema, nn.Module):
        return unwrap_model(model_ema)
    raise CheckpointError(f"model_ema is a {type(model_ema).__name__}, which has no .module/.ema to save; pass "
                          "a timm ModelEma* or an nn.Module")


_PLAIN = (str, int, float, bool, type(None))


def args_to_dict(args: Any) -> Dict[str, Any]:
    """``vars(args)`` reduced to str/int/float/bool/None and lists of them; anything else becomes its str()."""
    if args is None:
        return {}
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {str(key): _plain_value(value) for key, value in items.items()}


def _plain_value(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_value(item) for item in value]
    if isinstance(value, Mapping):  # --model-kwargs: a dict compares equal whatever order the flags came in
        return {str(key): _plain_value(item) for key, item in value.items()}
    return str(value)


_SAFE_LEAVES = (torch.Tensor, str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def _check_weights_only_safe(obj: Any, *, where: str) -> None:
    """Walk containers and raise if any leaf is something ``weights_only=True`` would refuse to load."""
    if isinstance(obj, _SAFE_LEAVES):
        return
    # Exact types only: the unpickler allows these containers, not arbitrary subclasses (namedtuple, defaultdict).
    if type(obj) in (dict, OrderedDict, list, tuple):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            _check_weights_only_safe(value, where=f"{where}[{key!r}]")
        return
    raise CheckpointError(
        f"cannot save {where}: it is a {type(obj).__name__}, which torch.load(weights_only=True) would refuse on "
        "resume. Store tensors or plain str/int/float/bool/list/dict values there instead")


# ------------------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> Dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and ``random`` states, as tensors and plain Python values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # numpy's MT19937 key is a uint32 array; int64 holds it exactly and every torch build can store it.
        "numpy": [str(np_name), torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "python": [int(py_version), list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; CUDA states are restored for the devices both runs have."""
    torch.set_rng_state(state["torch"].cpu())
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.cpu().numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states: List[torch.Tensor] = list(state["cuda"])[: torch.cuda.device_count()]
        for device, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def _rank_and_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every rank's ``capture_rng_state()`` in rank order, on rank 0 (an empty list elsewhere).

    A collective under torch.distributed: every rank must call it, at the same point of the run.
    """
    state = capture_rng_state()
    rank, world = _rank_and_world()
    if world == 1:
        return [state]
    gathered: Optional[List[Any]] = [None] * world if rank == 0 else None
    dist.gather_object(state, gathered, dst=0)
    return list(gathered) if gathered is not None else []


def restore_rank_rng(state: Mapping[str, Any], *, source: str = "checkpoint") -> None:
    """Give this rank back its own RNG streams from a training state.

    With as many ranks as the checkpoint was written by, rank r restores rank r's states: dropout, drop-path,
    random masks and augmentation continue as if the run had not stopped, and the ranks' streams stay distinct.
    With another rank count (or a checkpoint from before per-rank states), no stream beyond rank 0's exists: rank 0
    continues rank 0's, every other rank starts a fresh stream of its own from (--seed, rank, epoch), never a copy
    of rank 0's, and a note says the resume is not an exact continuation.
    """
    rank, world = _rank_and_world()
    per_rank = state.get("rng_per_rank")
    saved_world = len(per_rank) if per_rank else 1
    if per_rank and saved_world == world:
        restore_rng_state(per_rank[rank])
        return
    if saved_world != world and rank == 0:
        print(f"note: {source} holds the RNG states of {saved_world} process(es), this run has {world}: random "
              "augmentation, dropout and masks continue on new per-rank streams, not exactly as before")
    if rank == 0 and "rng" in state:
        restore_rng_state(state["rng"])
        return
    config = state.get("config") or state.get("args") or {}
    fresh = np.random.SeedSequence([int(config.get("seed", 0) or 0), rank, int(state.get("epoch", 0))])
    seed = int(fresh.generate_state(1)[0])
    torch.manual_seed(seed)  # also every CUDA device's generator
    np.random.seed(seed)
    random.seed(seed)


# ------------------------------------------------------------------------------------------------------ resume


def find_resume(output_dir: Optional[PathLike], resume_arg: Optional[str]) -> Optional[str]:
    """An explicit ``--resume`` wins; otherwise ``<output_dir>/checkpoint.pth`` if a previous run left one."""
    if resume_arg:
        return resume_arg
    if output_dir:
        candidate = os.path.join(os.fspath(output_dir), "checkpoint.pth")
        if os.path.isfile(candidate):
            return candidate
    return None
