"""deit_patch.timm_task against timm's own TrainingTask API, and deit_patch.timm_train's command-line plumbing.

Every expected value is computed here from the models' parts (class-token attention, top-k, gathered tokens, KL)
or from timm's unmodified LogitDistillationTask, never from the code under test.
"""
import copy
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymodels import NUM_CLASSES, ROOT, tiny
from deit_patch.teachers import pruned_forward

try:
    import timm.task as timm_task
    HAS_TASK = hasattr(timm_task, "LogitDistillationTask")
except ImportError:
    timm_task, HAS_TASK = None, False
needs_task = pytest.mark.skipif(not HAS_TASK, reason="this timm has no timm.task (needs timm >= 1.0.23)")

TEACHER_STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # differ from the student's ImageNet stats


def models(teacher_name="deit_tiny_patch16_224", student_name="deit_tiny_patch16_224"):
    student = tiny(student_name, seed=0)
    teacher = tiny(teacher_name, seed=1, depth=3)
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, **TEACHER_STATS}  # timm's normalize_input must convert
    return student, teacher


def data(batch=4, seed=123):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def masked_task(student, teacher, **kwargs):
    from deit_patch.timm_task import MaskedLogitDistillationTask
    kwargs.setdefault("criterion", nn.CrossEntropyLoss())
    kwargs.setdefault("temperature", 2.0)
    kwargs.setdefault("verbose", False)
    return MaskedLogitDistillationTask(student, teacher, **kwargs).train()


# --- independent computations ---------------------------------------------------------------------------
def hand_class_attention(model, x):
    """Last block's class-token attention over the patches, mean over heads, from the block's own parts."""
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        attn = model.blocks[-1].attn
        h = model.blocks[-1].norm1(tokens)
        b, n, c = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, H, 1, N)
        return weights.mean(1)[:, 0, model.num_prefix_tokens:]


def hand_topk(scores, k):
    return torch.stack([torch.sort(torch.argsort(row, descending=True)[:k]).values for row in scores])


def hand_teacher_input(x, student, teacher):
    mean_s, std_s = (torch.tensor(student.pretrained_cfg[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    mean_t, std_t = (torch.tensor(teacher.pretrained_cfg[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    return (x * std_s + mean_s - mean_t) / std_t


def hand_pruned_vit(model, x, keep):
    """Class token + kept patches (position embeddings added first), blocks, norm, class-token head."""
    with torch.no_grad():
        patches = model.patch_embed(x)
        tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), patches], 1) + model.pos_embed
        kept = torch.stack([tokens[b, 1:][keep[b]] for b in range(x.shape[0])])
        out = torch.cat([tokens[:, :1], kept], 1)
        for block in model.blocks:
            out = block(out)
        return model.head(model.norm(out)[:, 0])


def hand_kd(student_logits, teacher_logits, t):
    log_p_s = torch.log_softmax(student_logits / t, -1)
    p_t = torch.softmax(teacher_logits / t, -1)
    return (p_t * (torch.log(p_t) - log_p_s)).sum() / student_logits.shape[0] * t * t


# --- the module on a timm without timm.task ---------------------------------------------------------------
OLD_TIMM = "/opt/timm-0.9.16"


@pytest.mark.skipif(not os.path.isdir(OLD_TIMM), reason=f"no old timm copy at {OLD_TIMM}")
def test_old_timm_imports_the_module_and_names_the_timm_needed():
    code = textwrap.dedent("""
        import sys, timm
        assert not hasattr(timm, "task") and timm.__version__.startswith("0.9"), timm.__version__
        import deit_patch.timm_task as m
        assert not m.has_logit_task and not m.has_token_task
        try:
            m.MaskedLogitDistillationTask(None, None)
        except m.TimmTaskUnavailable as err:
            print("REFUSED", err)
        print("APP", sorted(k for k in sys.modules if k.split(".")[0] == "maskedkd_app"))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([OLD_TIMM, ROOT])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED" in out.stdout and "timm >= 1.0.23" in out.stdout and "pip install" in out.stdout, out.stdout
    assert "APP []" in out.stdout


# --- constructor -------------------------------------------------------------------------------------------
@needs_task
@pytest.mark.parametrize("name,base", [("MaskedLogitDistillationTask", "LogitDistillationTask"),
                                       ("MaskedTokenDistillationTask", "TokenDistillationTask")])
def test_constructor_is_timms_plus_masking(name, base):
    import inspect
    import deit_patch.timm_task as module
    ours, theirs = getattr(module, name), getattr(timm_task, base)
    assert issubclass(ours, theirs)
    extra = inspect.signature(ours.__init__).parameters
    assert all(extra[k].kind == inspect.Parameter.KEYWORD_ONLY for k in ("keep_ratio", "num_keep", "mask_mode"))
    # timm's arguments pass through unchanged, by position and by name
    student, teacher = models(student_name="deit_tiny_distilled_patch16_224" if "Token" in name
                              else "deit_tiny_patch16_224")
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    task = ours(student, teacher, criterion, temperature=3.0, task_loss_weight=0.25, verbose=False, keep_ratio=0.5)
    reference = theirs(copy.deepcopy(student), copy.deepcopy(teacher), criterion, temperature=3.0,
                       task_loss_weight=0.25, verbose=False)
    assert task.criterion is criterion and task.temperature == reference.temperature == 3.0
    assert (task.task_loss_weight, task.distill_loss_weight) == (reference.task_loss_weight,
                                                                  reference.distill_loss_weight)
    assert task.masked_teacher.num_keep == 8


@needs_task
def test_bad_settings_are_refused_clearly():
    from deit_patch.teachers import UnsupportedTeacherError
    student, teacher = models()
    with pytest.raises(ValueError, match="mask_mode='bogus'"):
        masked_task(student, teacher, mask_mode="bogus")
    with pytest.raises(ValueError, match="keep_ratio=1.5"):
        masked_task(student, teacher, keep_ratio=1.5)
    import timm
    cnn = timm.create_model("test_resnet", num_classes=NUM_CLASSES)  # timm's tiny CNN: no patch tokens
    with pytest.raises(UnsupportedTeacherError, match="keep_ratio=1.0"):
        masked_task(student, cnn, keep_ratio=0.5)
    unmasked = masked_task(student, cnn)  # no keep asked: a CNN teacher runs unmasked, as in timm
    assert unmasked.masked_teacher is None and unmasked(*data())["num_keep"] == 0


@needs_task
def test_unloadable_teacher_weights_name_the_fix(tmp_path):
    from deit_patch.timm_task import TeacherWeightsUnavailable
    student, _ = models()
    with pytest.raises(TeacherWeightsUnavailable, match="teacher_pretrained_path"):
        masked_task(student, "deit_tiny_patch16_224", teacher_pretrained_path=str(tmp_path / "missing.pth"))


# --- equivalence -----------------------------------------------------------------------------------------
@needs_task
@pytest.mark.parametrize("kwargs", [{"keep_ratio": 1.0}, {"keep_ratio": 0.5, "mask_mode": "none"}])
def test_keep_all_equals_timms_logit_task(kwargs):
    student, teacher = models()
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    x, y = data()
    ours = masked_task(student, teacher, task_loss_weight=0.3, **kwargs)
    timms = timm_task.LogitDistillationTask(ref_student, ref_teacher, criterion=nn.CrossEntropyLoss(),
                                           temperature=2.0, task_loss_weight=0.3, verbose=False).train()
    got, want = ours(x, y), timms(x, y)
    for key in ("loss", "output", "task_loss", "kd_loss"):
        assert torch.equal(got[key], want[key]), key
    assert got["num_keep"] == 16  # every teacher patch (32 px / 8 px patches)
    got["loss"].backward()
    want["loss"].backward()
    for (name, a), b in zip(student.named_parameters(), ref_student.parameters()):
        assert torch.equal(a.grad, b.grad), name


@needs_task
def test_masked_teacher_sees_the_top_k_of_the_students_class_attention():
    student, teacher = models()
    x, y = data()
    task = masked_task(student, teacher, keep_ratio=0.5, task_loss_weight=0.3)
    seen = []
    task.teacher.register_forward_hook(lambda module, args, out: seen.append(out))
    result = task(x, y)

    keep = hand_topk(hand_class_attention(student, x), 8)
    assert torch.equal(task.masked_teacher.last_step.keep_idx, keep)
    assert result["num_keep"] == 8
    x_t = hand_teacher_input(x, student, teacher)
    by_hand = hand_pruned_vit(teacher, x_t, keep)
    with torch.no_grad():
        project = pruned_forward(teacher, x_t, keep)
        full = teacher(x_t)
    torch.testing.assert_close(seen[0], by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[0], project, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen[0], full, atol=1e-3), "the teacher was not masked"
    kd = hand_kd(result["output"].detach(), by_hand, 2.0)
    torch.testing.assert_close(result["kd_loss"].detach(), kd, rtol=1e-5, atol=1e-6)
    task_loss = F.cross_entropy(result["output"].detach(), y)
    torch.testing.assert_close(result["loss"].detach(), 0.3 * task_loss + 0.7 * kd, rtol=1e-5, atol=1e-6)
    assert task.stats()["teacher_tokens_kept_frac"] == pytest.approx((1 + 8) / (1 + 16))


@needs_task
def test_token_task_masks_from_the_class_token_and_distils_the_dist_head():
    from deit_patch.timm_task import MaskedTokenDistillationTask
    student, teacher = models(student_name="deit_tiny_distilled_patch16_224")
    x, y = data()
    task = MaskedTokenDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), temperature=2.0,
                                       num_keep=5, verbose=False).train()
    result = task(x, y)
    keep = hand_topk(hand_class_attention(student, x), 5)  # prefix = class + distillation token
    assert torch.equal(task.masked_teacher.last_step.keep_idx, keep)
    with torch.no_grad():
        cls_logits, dist_logits = student(x)
    teacher_logits = hand_pruned_vit(teacher, hand_teacher_input(x, student, teacher), keep)
    torch.testing.assert_close(result["distill_loss"].detach(), hand_kd(dist_logits, teacher_logits, 2.0),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(result["output"].detach(), cls_logits) and result["num_keep"] == 5


@needs_task
def test_compiled_teacher_is_pruned_through_its_module():
    student, teacher = models()
    x, y = data()
    reference = masked_task(copy.deepcopy(student), copy.deepcopy(teacher), keep_ratio=0.5)(x, y)
    task = masked_task(student, torch.compile(teacher, backend="eager"), keep_ratio=0.5)
    torch.testing.assert_close(task(x, y)["kd_loss"], reference["kd_loss"], rtol=1e-6, atol=1e-7)


@needs_task
@pytest.mark.skipif(not HAS_TASK or getattr(timm_task.LogitDistillationTask, "compile") is nn.Module.compile,
                    reason="this timm's tasks have no compile() of their own (timm < 1.0.27)")
def test_task_compile_compiles_student_and_pruned_teacher():
    student, teacher = models()
    x, y = data()
    reference = masked_task(copy.deepcopy(student), copy.deepcopy(teacher), keep_ratio=0.5)(x, y)
    task = masked_task(student, teacher, keep_ratio=0.5)
    # timm's compile(): the student and the pruned teacher forward get compiled, the mask choice stays eager.
    task.compile(backend="eager")
    assert task.masked_teacher.compile_teacher and task.teacher.model.masked_teacher is task.masked_teacher
    again = task(x, y)
    assert torch.equal(task.masked_teacher.last_step.keep_idx, hand_topk(hand_class_attention(student, x), 8))
    torch.testing.assert_close(again["kd_loss"], reference["kd_loss"], rtol=1e-5, atol=1e-6)


# --- checkpoint state ------------------------------------------------------------------------------------
@needs_task
@pytest.mark.skipif(not HAS_TASK or not hasattr(timm_task.TrainingTask, "get_checkpoint_state"),
                    reason="this timm's tasks keep no checkpoint state (timm < 1.0.27)")
def test_checkpoint_state_round_trips_through_timms_resume(tmp_path, caplog):
    student, teacher = models()
    task = masked_task(student, teacher, keep_ratio=0.5)
    for seed in (1, 2):
        task(*data(seed=seed))["loss"].backward()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({**task.get_checkpoint_state(), "epoch": 3, "version": 2}, path)

    fresh_student, fresh_teacher = models()
    with torch.no_grad():
        for p in fresh_student.parameters():
            p.add_(1.0)  # differs until the checkpoint restores it
    fresh = masked_task(fresh_student, fresh_teacher, keep_ratio=0.5)
    assert timm_task.resume_task_checkpoint(fresh, str(path), log_info=False) == 4
    assert fresh.get_task_state() == task.get_task_state()
    assert fresh.get_task_state()["maskedkd"]["teacher_images"] == 8
    for a, b in zip(fresh_student.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)

    other = masked_task(*models(), keep_ratio=0.25)
    with caplog.at_level(logging.WARNING, logger="deit_patch.timm_task"):
        timm_task.resume_task_checkpoint(other, str(path), log_info=False)
    assert "num_keep 8 -> 4" in caplog.text  # resumed with another keep: said, not silent
    other.setup_ema()
    assert "maskedkd" not in other.get_checkpoint_state(ema=True).get("task_state_ema", {})


# --- DDP: 2 CPU processes equal 1 -------------------------------------------------------------------------
DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist, torch.nn as nn
from tinymodels import tiny
from deit_patch.timm_task import MaskedLogitDistillationTask

def worker(rank, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT={port!r})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    student = tiny(seed=0)
    task = MaskedLogitDistillationTask(student, tiny(seed=1, depth=3), criterion=nn.CrossEntropyLoss(),
                                       temperature=2.0, keep_ratio=0.5, verbose=False).train()
    task.prepare_distributed(device_ids=[torch.device("cpu")])  # what timm's train.py passes on CPU
    wrapped = task._modules.get("trainable_module") or task._modules["student"]  # timm >= 1.0.27 / older
    assert isinstance(wrapped, nn.parallel.DistributedDataParallel)
    x, y = torch.load(out + ".batch")
    result = task(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
    result["loss"].backward()
    losses, keeps = [None, None], [None, None]
    dist.all_gather_object(losses, result["loss"].item())
    dist.all_gather_object(keeps, task.masked_teacher.last_step.keep_idx)
    if rank == 0:
        torch.save({{"loss": sum(losses) / 2, "keep": torch.cat(keeps),
                    "grads": {{n: p.grad for n, p in student.named_parameters()}}}}, out + ".ddp")
    dist.destroy_process_group()

if __name__ == "__main__":
    # fork: the workers reuse this process's imports instead of paying for their own
    torch.multiprocessing.start_processes(worker, args=(sys.argv[1],), nprocs=2, start_method="fork")
"""


@needs_task
def test_ddp_two_cpu_processes_equal_one(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "ddp_task.py"
    script.write_text(DDP_SCRIPT.format(port=port))
    out = str(tmp_path / "result")
    x, y = data(batch=8, seed=5)
    torch.save((x, y), out + ".batch")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(script), out], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = torch.load(out + ".ddp")

    student = tiny(seed=0)  # the same models in one process, on the whole batch
    task = masked_task(student, tiny(seed=1, depth=3), keep_ratio=0.5)
    result = task(x, y)
    result["loss"].backward()
    assert torch.equal(ddp["keep"], task.masked_teacher.last_step.keep_idx)
    assert ddp["loss"] == pytest.approx(result["loss"].item(), rel=1e-5)
    for name, param in student.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- python -m deit_patch.timm_train ------------------------------------------------------------------------
FAKE_TRAIN = """
import argparse, sys, torch, torch.nn as nn
from timm.task import LogitDistillationTask
from tinymodels import tiny
parser = argparse.ArgumentParser()
parser.add_argument("--kd-model-name")
parser.add_argument("--kd-temperature", type=float)
parser.add_argument("--save-teacher")
args = parser.parse_args()
teacher = tiny(seed=1) if args.kd_model_name == "tiny" else args.kd_model_name
task = LogitDistillationTask(student_model=tiny(seed=0), teacher_model=teacher, criterion=nn.CrossEntropyLoss(),
                             temperature=args.kd_temperature, verbose=False)
print("TASK", type(task).__name__, getattr(getattr(task, "masked_teacher", None), "num_keep", None),
      task.temperature)
if args.save_teacher:
    torch.save(task.masked_teacher.teacher.state_dict(), args.save_teacher)
"""


@needs_task
def test_cli_puts_the_masked_task_behind_train_pys_names(tmp_path, capsys, monkeypatch):
    from deit_patch.timm_train import main, run
    script = tmp_path / "train.py"
    script.write_text(FAKE_TRAIN)
    original = timm_task.LogitDistillationTask
    run(["--timm-train", str(script), "--kd-model-name", "tiny", "--num-keep", "6", "--kd-temperature", "3",
         "--no-flops"])
    assert "TASK MaskedLogitDistillationTask 6 3.0" in capsys.readouterr().out
    assert timm_task.LogitDistillationTask is original  # put back after the run

    # a teacher named on the command line, built with --kd-model-kwargs from a local --kd-checkpoint
    weights = tiny(seed=7).state_dict()
    torch.save(weights, tmp_path / "teacher.pth")
    run(["--timm-train", str(script), "--kd-model-name", "deit_tiny_patch16_224", "--kd-checkpoint",
         str(tmp_path / "teacher.pth"), "--kd-model-kwargs", "img_size=32", "patch_size=8", "depth=2",
         "--kd-temperature", "1", "--save-teacher", str(tmp_path / "built.pth"), "--no-flops"])
    assert "TASK MaskedLogitDistillationTask 8 1.0" in capsys.readouterr().out
    built = torch.load(tmp_path / "built.pth")
    assert built.keys() == weights.keys() and all(torch.equal(built[k], weights[k]) for k in weights)

    monkeypatch.setattr(sys, "argv", ["timm_train", "--timm-train", str(script), "--kd-model-name", "tiny",
                                      "--kd-checkpoint", str(tmp_path / "nope.pth")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and "--kd-checkpoint" in capsys.readouterr().err


def test_cli_refuses_a_train_py_without_timm_task(tmp_path):
    from deit_patch.timm_train import TimmTrainError, check_train_script, split_args
    old = tmp_path / "train.py"
    old.write_text("import timm\nprint('an old train.py')\n")
    with pytest.raises(TimmTrainError, match="timm >= 1.0.23"):
        check_train_script(str(old))
    with pytest.raises(TimmTrainError, match="not a file"):
        check_train_script(str(tmp_path / "absent.py"))
    argv = ["--timm-train", "t.py", "--keep", "3", "--keep-ratio", "0.25", "-b", "8"]
    if not HAS_TASK:  # an old timm: the command line is refused naming the timm it needs
        from deit_patch.timm_task import TimmTaskUnavailable
        from deit_patch.timm_train import run
        with pytest.raises(TimmTaskUnavailable, match="timm >= 1.0.23"):
            run(argv)
        return
    ours, rest = split_args(argv)
    assert ours.keep_ratio == 0.25 and rest == ["--keep", "3", "-b", "8"]  # no prefix matching of train.py flags


@needs_task
@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(temperature=0.0),
                                 dict(task_loss_weight=float("inf")), dict(distill_loss_weight=-1.0),
                                 dict(keep_ratio=float("nan")), dict(num_keep=2.5), dict(probe_every=-3)])
def test_numbers_are_refused_where_they_enter_naming_the_argument(bad):
    student, teacher = models()
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        masked_task(student, teacher, **{"keep_ratio": 0.5, **bad})
