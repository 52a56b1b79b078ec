"""DeiT-shaped training loop: ``train_one_epoch`` and ``evaluate``.

The hot loop never syncs with the device per step: the loss and its finiteness are accumulated on the device and
read only when a progress line is printed (every ``print_freq`` steps), which is also where a non-finite loss is
detected, agreed on across ranks, and reported with the first step at which it appeared.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
from timm.utils import accuracy, dispatch_clip_grad

from deit_patch.quality import quality_summary
from losses import DistillationLoss

from .distributed import MetricLogger, SmoothedValue, get_world_size, is_dist_avail_and_initialized

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the run stops before anything is saved."""

    def __init__(self, *, epoch: int, step: int):
        super().__init__(f"loss is not finite at epoch {epoch}, step {step}: stopping without writing a checkpoint "
                         "(the last good one is kept). Lower --lr, set --clip-grad, or use --amp-dtype bf16/none")
        self.epoch, self.step = epoch, step


def autocast(device: torch.device, amp_dtype: Optional[str]):
    dtype = AMP_DTYPES.get(amp_dtype or "none")
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _first_bad_step(first_bad: torch.Tensor) -> int:
    # Every rank reaches this at the same step, so the collective cannot hang; one bad rank stops them all.
    if is_dist_avail_and_initialized():
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
    return int(first_bad.item())


def _optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, loss_scaler,
                    max_norm: Optional[float]) -> None:
    # --clip-grad bounds the step the optimizer takes: every parameter it updates, the criterion's trainable heads
    # (ViTKD) as much as the student, in one norm. The student's parameters alone would leave the heads unclipped.
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if loss_scaler is not None:  # fp16: timm's NativeScaler scales, unscales before clipping, and steps
        loss_scaler(loss, optimizer, clip_grad=max_norm, parameters=params)
        return
    loss.backward()
    if max_norm:
        dispatch_clip_grad(params, max_norm)
    optimizer.step()


def train_one_epoch(model: nn.Module, criterion: DistillationLoss, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, *, loss_scaler=None,
                    amp_dtype: Optional[str] = None,
                    max_norm: Optional[float] = None, model_ema=None, mixup_fn=None, set_training_mode: bool = True,
                    bce_loss: bool = False, print_freq: int = 10, mask_recorder=None,
                    max_steps: Optional[int] = None) -> Dict[str, float]:
    model.train(set_training_mode)
    criterion.train()
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    first_bad = torch.full((), torch.iinfo(torch.int64).max, device=device, dtype=torch.int64)
    images = steps = 0
    interval_sum, interval_steps = 0.0, 0
    start = time.time()
    for step, (samples, targets) in enumerate(logger.log_every(data_loader, print_freq, header)):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        if bce_loss:
            targets = targets.gt(0.0).type(targets.dtype)
        with autocast(device, amp_dtype):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        detached = loss.detach()
        first_bad = torch.where(torch.isfinite(detached), first_bad,
                                torch.minimum(first_bad, first_bad.new_tensor(step)))
        loss_sum += detached
        optimizer.zero_grad(set_to_none=True)
        _optimizer_step(loss, optimizer, loss_scaler=loss_scaler, max_norm=max_norm)
        if model_ema is not None:
            model_ema.update(model)
        keep_idx = criterion.last_step.keep_idx  # the step's record: which teacher patches it kept
        if mask_recorder is not None and keep_idx is not None:
            mask_recorder.observe(keep_idx, samples)
        images += samples.shape[0]
        steps += 1
        last = step == len(data_loader) - 1 or (max_steps is not None and steps >= max_steps)
        if step % print_freq == 0 or last:
            bad = _first_bad_step(first_bad)
            if bad != torch.iinfo(torch.int64).max:
                raise NonFiniteLossError(epoch=epoch, step=bad)
            total = float(loss_sum.item())
            meter = criterion.meter
            logger.update(loss=(total - interval_sum) / max(steps - interval_steps, 1),
                          lr=optimizer.param_groups[0]["lr"], kept=meter.patch_share if meter.images else None)
            interval_sum, interval_steps = total, steps
        if max_steps is not None and steps >= max_steps:
            break
    seconds = time.time() - start
    loss_avg = torch.stack([loss_sum, loss_sum.new_tensor(steps)])
    if is_dist_avail_and_initialized():
        torch.distributed.all_reduce(loss_avg)
    stats = {"loss": float(loss_avg[0] / loss_avg[1].clamp_min(1)), "lr": optimizer.param_groups[0]["lr"],
             "epoch_seconds": seconds, "images_per_s": images * get_world_size() / max(seconds, 1e-9)}
    # The loss terms apart, the teacher's patch share and prefix tokens, and whether masking helps (quality.py).
    stats.update(criterion.pop_stats(all_reduce=is_dist_avail_and_initialized()))
    print("Averaged stats:", {k: round(v, 5) for k, v in stats.items()})
    summary = quality_summary(stats)
    if summary:
        print(summary)
    return stats


@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device, *, amp_dtype: Optional[str] = None,
             reduce: bool = False, print_freq: int = 10) -> Dict[str, float]:
    """Top-1/top-5 and loss; ``reduce`` sums counts over ranks (--dist-eval, each rank saw a shard)."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss, correct@1, correct@5, images
    logger = MetricLogger(delimiter="  ")
    for images, target in logger.log_every(data_loader, print_freq, "Test:"):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        top1, top5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        n = images.shape[0]
        totals += torch.stack([criterion(output, target).double(), top1.double() * n / 100,
                               top5.double() * n / 100, totals.new_tensor(n)])
    if reduce and is_dist_avail_and_initialized():
        torch.distributed.all_reduce(totals)
    loss, c1, c5, n = totals.tolist()
    n = max(n, 1.0)
    stats = {"loss": loss / n, "acc1": 100 * c1 / n, "acc5": 100 * c5 / n, "images": n}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} on {int(n)} images")
    return stats
