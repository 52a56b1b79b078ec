"""The teacher that ships in maskedkd_app/assets: checksum checked, architecture as recorded, accurate on its data."""
import shutil

import pytest
import torch

from maskedkd_app import shipped_teacher
from maskedkd_app.checkpoint import CheckpointError
from maskedkd_app.data import ProceduralObjects


def test_shipped_teacher_is_accurate_on_val_images():
    info = shipped_teacher.verify()
    model = shipped_teacher.load()
    # The first 300 val images of the split it was evaluated on, built here from the recorded data settings.
    data = ProceduralObjects(300, num_classes=info["num_classes"], img_size=info["img_size"],
                             seed=info["data"]["procedural_seed"], split="val", mean=info["mean"], std=info["std"])
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data.label(i) for i in range(len(data))])
    with torch.no_grad():
        acc = 100.0 * (model(x).argmax(-1) == y).float().mean().item()
    # 300 images: the binomial std at 95% is ~1.3 points, so 4 points below the recorded figure is a real loss.
    assert acc >= info["val_acc1"] - 4.0, (acc, info["val_acc1"])
    assert acc >= 90.0  # a floor independent of the record: a teacher worth distilling from
    assert info["val_acc1"] >= 95.0  # what it was trained to (full val split), so the demo shows a strong teacher


def test_record_matches_the_recorded_command():
    info = shipped_teacher.read_meta()
    argv = info["argv"]
    assert argv[argv.index("--model") + 1] == info["model"]
    kwargs = argv[argv.index("--model-kwargs") + 1:]
    kwargs = dict(a.split("=") for a in kwargs[:next((i for i, a in enumerate(kwargs) if a.startswith("--")),
                                                       len(kwargs))])
    assert {k: str(v) for k, v in info["model_kwargs"].items()} == kwargs
    assert argv[argv.index("--input-size") + 1] == str(info["img_size"])
    assert argv[argv.index("--procedural-val-size") + 1] == str(info["data"]["val_size"])
    assert info["command"].startswith("python main_maskedkd.py ")


def test_tampered_or_missing_weights_are_refused(tmp_path):
    bad = tmp_path / "teacher.safetensors"
    shutil.copy(shipped_teacher.WEIGHTS, bad)
    blob = bytearray(bad.read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit pattern in the last weight byte
    bad.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        shipped_teacher.verify(weights=bad)
    with pytest.raises(CheckpointError, match="missing"):
        shipped_teacher.verify(weights=tmp_path / "absent.safetensors")


def test_teacher_flags_pass_the_training_statistics():
    # timm's pretrained_cfg for vit_small_patch16_224 says mean/std 0.5: without the explicit flags the loss would
    # re-normalise the batch for a teacher that was trained on ImageNet statistics.
    info = shipped_teacher.read_meta()
    flags = shipped_teacher.teacher_flags(info)
    mean = [float(v) for v in flags[flags.index("--teacher-mean") + 1:flags.index("--teacher-mean") + 4]]
    assert mean == pytest.approx(info["mean"]) and info["mean"] != [0.5, 0.5, 0.5]
