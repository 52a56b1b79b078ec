"""Process-group setup and metric logging for torchrun launches (the DeiT ``utils.py`` equivalent).

Everything here degrades to a single-process no-op when no process group exists, so the training script,
tests and notebooks call the same functions whether or not they run under ``torchrun``.
"""
from __future__ import annotations

import builtins
import datetime
import os
import time
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

# Kept so a master process (or a test) can get the real print back after setup_for_distributed(False).
_BUILTIN_PRINT = builtins.print

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# ----------------------------------------------------------------------------------------------- process group


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on non-master ranks (``print(..., force=True)`` still prints); restore it on the master."""
    if is_master:
        builtins.print = _BUILTIN_PRINT
        return

    def rank_filtered_print(*args: Any, **kwargs: Any) -> None:
        if kwargs.pop("force", False):
            _BUILTIN_PRINT(*args, **kwargs)

    builtins.print = rank_filtered_print


def _launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARS)


def init_distributed_mode(args: Any) -> None:
    """Join the process group torchrun describes in the environment, or mark ``args`` as single-process.

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu`` and ``args.dist_backend``.
    """
    if not _launched_by_torchrun():
        args.distributed, args.rank, args.world_size, args.gpu, args.dist_backend = False, 0, 1, None, None
        print("Not using distributed mode")
        return

    args.rank = int(os.environ["RANK"])
    args.world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    on_gpu = str(getattr(args, "device", "cuda")).startswith("cuda") and torch.cuda.is_available()
    # NCCL only moves CUDA tensors; gloo covers CPU runs (and CI) with the same code path.
    args.dist_backend = "nccl" if on_gpu else "gloo"
    args.gpu = local_rank if on_gpu else None
    if on_gpu:
        # Before init so NCCL binds this rank to its own GPU instead of everyone piling onto cuda:0.
        torch.cuda.set_device(local_rank)
    args.distributed = True
    if dist.is_initialized():  # a second run in one process (the demo's teacher, then student) reuses the group
        return
    print(f"| distributed init (rank {args.rank}/{args.world_size}, local rank {local_rank}, "
          f"backend {args.dist_backend})", flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method="env://",
                            world_size=args.world_size, rank=args.rank)
    barrier()
    setup_for_distributed(args.rank == 0)


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def cleanup() -> None:
    """Tear down the process group, so the next init in the same process (tests, notebooks) starts clean."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def _reduction_device() -> torch.device:
    # NCCL can only reduce tensors on the rank's current GPU; every other backend takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over all ranks; ``value`` itself when single-process."""
    if not is_dist_avail_and_initialized():
        return float(value)
    tensor = torch.tensor(float(value), dtype=torch.float64, device=_reduction_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item() / get_world_size()


# ------------------------------------------------------------------------------------------------------ meters


def _as_number(name: str, value: Any) -> float:
    """Accept python numbers and one-element tensors; a tensor costs one host sync, so prefer passing floats."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} got a tensor of shape {tuple(value.shape)}; "
                             f"log a scalar (e.g. reduce it with .mean() first)")
        return value.item()
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"metric {name!r} got {type(value).__name__}; pass an int, float or one-element tensor")


class SmoothedValue:
    """A series of values with a sliding-window view (median, avg, max, latest) and an exact global average."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        """Record ``value`` as the mean of ``n`` samples (a batch mean with its batch size, say)."""
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over ranks so ``global_avg`` covers every rank; the window stays local."""
        if not is_dist_avail_and_initialized():
            return
        tensor = torch.tensor([self.count, self.total], dtype=torch.float64, device=_reduction_device())
        dist.barrier()
        dist.all_reduce(tensor)
        count, total = tensor.tolist()
        self.count, self.total = int(count), total

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float64).mean().item()

    @property
    def global_avg(self) -> float:
        if self.count == 0:
            return float("nan")  # nothing recorded yet: NaN rather than a ZeroDivisionError mid-log
        return self.total / self.count

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Named ``SmoothedValue`` meters plus a progress-printing iterator."""

    def __init__(self, delimiter: str = "\t"):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: Any) -> None:
        for name, value in kwargs.items():
            if value is None:
                continue  # lets callers pass optional metrics unconditionally
            self.meters[name].update(_as_number(name, value))

    def __getattr__(self, attr: str) -> SmoothedValue:
        # Only reached when normal lookup fails: exposes meters as attributes (logger.loss.global_avg).
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def global_averages(self) -> Dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def log_every(self, iterable: Iterable, print_freq: int, header: Optional[str] = None) -> Iterator:
        """Yield from ``iterable``, printing ETA, timings and meters every ``print_freq`` steps and at the end."""
        header = header or ""
        total = len(iterable)  # type: ignore[arg-type]
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total))
        parts = [header, f"[{{0:>{width}d}}/{total}]", "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            parts.append("max mem: {memory:.0f}")
        line = self.delimiter.join(parts)
        mib = 1024.0 * 1024.0

        start = end = time.time()
        for step, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            if step % print_freq == 0 or step == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - step - 1)))
                fields = dict(eta=eta, meters=str(self), time=str(iter_time), data=str(data_time))
                if on_gpu:
                    fields["memory"] = torch.cuda.max_memory_allocated() / mib
                print(line.format(step, **fields))
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f"{header} Total time: {elapsed} ({(time.time() - start) / max(total, 1):.4f} s / it)")
