"""Checkpoint I/O: atomic saves, safe teacher loading, clear errors, and a full training-state round trip."""
from __future__ import annotations

import argparse
import io
import os
import random
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from maskedkd_app import checkpoint as ckpt_mod
from maskedkd_app.checkpoint import (CheckpointError, extract_state_dict, find_resume, load_teacher,
                                   load_training_state, read_checkpoint, save_atomic, save_training_state)


def tiny_vit(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
                             patch_size=8, depth=2)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key


class Unpicklable:
    """Pickling it fails partway through a save, standing in for a crash mid-write."""

    def __reduce__(self):
        raise RuntimeError("boom while pickling")


class CustomPayload:
    """A user class: torch.save pickles it as code, so weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.value = 3


# ----------------------------------------------------------------------------------------------- save_atomic


def test_save_atomic_writes_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pth"
    save_atomic({"x": torch.arange(3)}, target)
    save_atomic({"x": torch.arange(5)}, target)  # replaces the existing file
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(5))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_save_atomic_failure_keeps_original_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pth"
    save_atomic({"x": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"x": torch.zeros(2), "bad": Unpicklable()}, target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_save_atomic_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        save_atomic({"x": torch.ones(1)}, tmp_path / "nope" / "checkpoint.pth")


# -------------------------------------------------------------------------------------------- teacher loading


@pytest.fixture
def source_model() -> nn.Module:
    return tiny_vit(seed=1)


def _write_teacher(kind: str, model: nn.Module, directory: Path) -> Path:
    sd = model.state_dict()
    if kind == "deit":
        path = directory / "teacher.pth"
        torch.save({"model": sd, "epoch": 3, "args": {"lr": 0.1}}, path)
    elif kind == "state_dict_key":
        path = directory / "teacher.pth"
        torch.save({"state_dict": sd}, path)
    elif kind == "plain":
        path = directory / "teacher.pth"
        torch.save(sd, path)
    elif kind == "ddp_prefixed":
        path = directory / "teacher.pth"
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif kind == "ddp_compiled_prefixed":
        path = directory / "teacher.pth"
        torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, path)
    elif kind == "safetensors":
        path = directory / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["deit", "state_dict_key", "plain", "ddp_prefixed", "ddp_compiled_prefixed",
                                  "safetensors"])
def test_load_teacher_formats(kind: str, source_model: nn.Module, tmp_path: Path) -> None:
    path = _write_teacher(kind, source_model, tmp_path)
    teacher = tiny_vit(seed=2)
    with pytest.raises(AssertionError):
        assert_same_weights(teacher, source_model)  # different seeds really differ, so the load below matters
    load_teacher(teacher, str(path))
    assert_same_weights(teacher, source_model)


def test_extract_state_dict_prefers_model_over_ema() -> None:
    model_sd = {"w": torch.ones(1)}
    ema_sd = {"w": torch.zeros(1)}
    assert torch.equal(extract_state_dict({"model_ema": ema_sd, "model": model_sd})["w"], torch.ones(1))
    assert torch.equal(extract_state_dict({"model_ema": ema_sd, "epoch": 1})["w"], torch.zeros(1))


def test_extract_state_dict_rejects_non_tensors() -> None:
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        extract_state_dict({"epoch": 3, "lr": 0.1})
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        extract_state_dict({"model": {}})


def test_url_goes_through_torch_hub(monkeypatch: pytest.MonkeyPatch, source_model: nn.Module) -> None:
    calls: Dict[str, object] = {}

    def fake_hub(url: str, **kwargs):
        calls["url"], calls["kwargs"] = url, kwargs
        return {"model": source_model.state_dict()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    url = "https://example.invalid/deit_tiny.pth"
    teacher = tiny_vit(seed=2)
    load_teacher(teacher, url)
    assert calls["url"] == url
    assert calls["kwargs"]["check_hash"] is False and calls["kwargs"]["map_location"] == "cpu"
    assert calls["kwargs"].get("weights_only") is True  # this torch has the keyword, so it must be used
    assert_same_weights(teacher, source_model)


def test_head_size_mismatch_is_reported(source_model: nn.Module, tmp_path: Path) -> None:
    path = _write_teacher("deit", tiny_vit(num_classes=1000), tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_teacher(source_model, str(path))
    message = str(info.value)
    assert "head.weight: checkpoint (1000, 192) vs model (10, 192)" in message
    assert "head.bias: checkpoint (1000,) vs model (10,)" in message
    assert "--nb-classes" in message and "--teacher-model" in message


def test_missing_and_unexpected_keys_are_reported(source_model: nn.Module, tmp_path: Path) -> None:
    sd = dict(source_model.state_dict())
    del sd["norm.weight"]
    sd["extra.weight"] = torch.ones(1)
    torch.save(sd, tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: norm\.weight.*unexpected keys: extra\.weight"):
        load_teacher(tiny_vit(), str(tmp_path / "t.pth"))
    # Not strict: key sets may differ, the shared keys still load.
    model = tiny_vit(seed=3)
    load_teacher(model, str(tmp_path / "t.pth"), strict=False)
    assert torch.equal(model.head.weight, source_model.head.weight)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match="not found.*nowhere.pth"):
        read_checkpoint(str(missing))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_corrupt(suffix: str, source_model: nn.Module, tmp_path: Path) -> None:
    good = _write_teacher("safetensors" if suffix == ".safetensors" else "deit", source_model, tmp_path)
    data = good.read_bytes()
    for cut in (len(data) // 2, 0):
        bad = tmp_path / f"bad{suffix}"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated checkpoint"):
            load_teacher(tiny_vit(), str(bad))


def test_garbage_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "g.pth").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="g.pth: it is a text file \\(it starts 'this is not a checkpoint"):
        read_checkpoint(str(tmp_path / "g.pth"))
    (tmp_path / "b.pth").write_bytes(bytes([7, 0, 200, 13, 0, 1]) * 10)
    with pytest.raises(CheckpointError, match="b.pth: it is a 60-byte binary file of no checkpoint format"):
        read_checkpoint(str(tmp_path / "b.pth"))


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "payload": CustomPayload()}, path)
    with pytest.raises(CheckpointError, match="pickled code/objects.*refused for safety") as info:
        read_checkpoint(str(path))
    assert "CustomPayload" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained deep traceback


# --------------------------------------------------------------------------------------------- training state


def _training_objects(seed: int) -> Tuple[nn.Module, torch.optim.Optimizer, object, ModelEmaV3]:
    model = tiny_vit(seed=seed)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=10, warmup_epochs=2)
    ema = ModelEmaV3(model, decay=0.9)
    return model, optimizer, scheduler, ema


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ema: ModelEmaV3,
                epoch: int) -> None:
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(dim=-1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ema.update(model)
    scheduler.step(epoch + 1)


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_training_state_round_trip(tmp_path: Path) -> None:
    model, optimizer, scheduler, ema = _training_objects(seed=0)
    _train_step(model, optimizer, scheduler, ema, epoch=4)
    args = argparse.Namespace(lr=1e-3, model="deit_tiny", output_dir=tmp_path, input_size=[32, 32], flag=None)
    path = tmp_path / "checkpoint.pth"
    save_training_state(path, model=model, optimizer=optimizer, lr_scheduler=scheduler, epoch=4, args=args,
                        model_ema=ema, extra={"best_acc": 71.5})
    after_save = (torch.rand(4), np.random.rand(3), random.random())

    # What was written loads with plain weights_only=True, and args became plain values.
    raw = torch.load(path, weights_only=True)
    assert raw["args"] == {"lr": 1e-3, "model": "deit_tiny", "output_dir": str(tmp_path), "input_size": [32, 32],
                           "flag": None}
    assert raw["extra"] == {"best_acc": 71.5}

    model2, optimizer2, scheduler2, ema2 = _training_objects(seed=7)
    with pytest.raises(AssertionError):
        assert_same_weights(model2, model)
    start_epoch = load_training_state(path, model=model2, optimizer=optimizer2, lr_scheduler=scheduler2,
                                      model_ema=ema2)
    after_load = (torch.rand(4), np.random.rand(3), random.random())

    assert start_epoch == 5
    assert_same_weights(model2, model)
    assert_same_weights(ema2.module, ema.module)
    with pytest.raises(AssertionError):
        assert_same_weights(ema.module, model)  # the EMA is really a different set of weights
    assert _tensors_equal(optimizer2.state_dict(), optimizer.state_dict())
    assert optimizer2.state_dict()["state"]  # a step was taken, so there is Adam state to compare
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert torch.equal(after_save[0], after_load[0])
    assert np.array_equal(after_save[1], after_load[1])
    assert after_save[2] == after_load[2]

    # Training continues identically from the restored state.
    torch.manual_seed(123)
    _train_step(model, optimizer, scheduler, ema, epoch=5)
    torch.manual_seed(123)
    _train_step(model2, optimizer2, scheduler2, ema2, epoch=5)
    assert_same_weights(model2, model)
    assert_same_weights(ema2.module, ema.module)


def test_training_state_without_rng_restore(tmp_path: Path) -> None:
    model, optimizer, scheduler, _ = _training_objects(seed=0)
    path = tmp_path / "checkpoint.pth"
    save_training_state(path, model=model, optimizer=optimizer, lr_scheduler=scheduler, epoch=0, args=None)
    fresh = tiny_vit(seed=5)
    torch.manual_seed(999)
    expected = torch.rand(3)
    torch.manual_seed(999)
    assert load_training_state(path, model=fresh, restore_rng=False) == 1
    assert torch.equal(torch.rand(3), expected)


def test_training_state_with_scaler(tmp_path: Path) -> None:
    model, optimizer, scheduler, _ = _training_objects(seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    path = tmp_path / "checkpoint.pth"
    save_training_state(path, model=model, optimizer=optimizer, lr_scheduler=scheduler, epoch=2, args={},
                        scaler=scaler)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    load_training_state(path, model=model, scaler=scaler2)
    assert scaler2.state_dict()["scale"] == 512.0


def test_resume_requires_ema_when_asked(tmp_path: Path) -> None:
    model, optimizer, scheduler, ema = _training_objects(seed=0)
    path = tmp_path / "checkpoint.pth"
    save_training_state(path, model=model, optimizer=optimizer, lr_scheduler=scheduler, epoch=0, args=None)
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        load_training_state(path, model=model, model_ema=ema)


def test_resume_from_weights_only_file_is_explained(source_model: nn.Module, tmp_path: Path) -> None:
    path = _write_teacher("deit", source_model, tmp_path)
    with pytest.raises(CheckpointError, match="not a maskedkd training-state checkpoint"):
        load_training_state(path, model=tiny_vit())


def test_unsafe_extra_is_refused_before_writing(tmp_path: Path) -> None:
    model, optimizer, scheduler, _ = _training_objects(seed=0)
    path = tmp_path / "checkpoint.pth"
    with pytest.raises(CheckpointError, match=r"\['extra'\]\['obj'\].*CustomPayload"):
        save_training_state(path, model=model, optimizer=optimizer, lr_scheduler=scheduler, epoch=0, args=None,
                            extra={"obj": CustomPayload()})
    assert not path.exists() and os.listdir(tmp_path) == []


def test_rng_state_is_weights_only_safe() -> None:
    state = ckpt_mod.capture_rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    expected = torch.rand(2)
    ckpt_mod.restore_rng_state(loaded)
    assert torch.equal(torch.rand(2), expected)


# ------------------------------------------------------------------------------------------------- find_resume


def test_find_resume(tmp_path: Path) -> None:
    assert find_resume(str(tmp_path), None) is None
    assert find_resume("", "") is None
    assert find_resume(None, None) is None
    (tmp_path / "checkpoint.pth").write_bytes(b"x")
    assert find_resume(str(tmp_path), None) == str(tmp_path / "checkpoint.pth")
    assert find_resume(str(tmp_path), "") == str(tmp_path / "checkpoint.pth")
    assert find_resume(str(tmp_path), "/explicit/ckpt.pth") == "/explicit/ckpt.pth"
    assert find_resume(None, "https://example.invalid/c.pth") == "https://example.invalid/c.pth"
