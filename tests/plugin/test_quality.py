"""Is masking helping? The logged teacher figures, the fidelity probe and the mask guard, against hand computations.

Every expected number is computed here from the teacher's own modules (patch embedding, position embedding, a
gather written in the test, blocks, norm, head), never through the plugin's pruned forward.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymodels import NUM_CLASSES, tiny
from deit_patch import masking
from deit_patch.quality import FidelityProbe, MaskGuardWarning
from losses import MaskedDistillationLoss

IMAGENET = dict(teacher_mean=(0.485, 0.456, 0.406), teacher_std=(0.229, 0.224, 0.225))


def hand_tokens(model, x):
    """Tokens after the position embedding, class token first, from the model's parts."""
    patches = model.patch_embed(x)
    if hasattr(model, "_pos_embed"):
        return model._pos_embed(patches)
    cls = model.cls_token.expand(x.shape[0], -1, -1)
    return torch.cat([cls, patches], dim=1) + model.pos_embed


def hand_logits(model, x, keep=None):
    """The teacher's logits on its class token + the patches in ``keep`` (None: all), pooled the model's way."""
    with torch.no_grad():
        tokens = hand_tokens(model, x)
        if keep is not None:
            index = keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            tokens = torch.cat([tokens[:, :1], torch.gather(tokens[:, 1:], 1, index)], dim=1)
        for block in model.blocks:
            tokens = block(tokens)
        tokens = model.norm(tokens)
        pooled = tokens[:, 1:].mean(dim=1) if getattr(model, "global_pool", "token") == "avg" else tokens[:, 0]
        return model.head(getattr(model, "fc_norm", nn.Identity())(pooled))


def entropy(logits):
    p = logits.softmax(1)
    return float(-(p * p.log()).sum(1).mean())


def kl(full, masked):
    return float((full.softmax(1) * (full.log_softmax(1) - masked.log_softmax(1))).sum(1).mean())


def batches(n, *, batch=4, seed=0, blank_right=False):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(batch, 3, 32, 32, generator=g)
        if blank_right:
            x[..., 16:] = 0  # the right half of the image carries nothing
        yield x, torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def masked_loss(student, teacher, **kwargs):
    kwargs.setdefault("keep_ratio", 0.5)
    return MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, **IMAGENET,
                                  **kwargs)


@pytest.mark.parametrize("soft_targets", [False, True], ids=["labels", "mixup-targets"])
def test_logged_teacher_top1_and_entropy_equal_a_hand_computation(soft_targets):
    student, teacher = tiny(seed=1), tiny(seed=2)
    crit = masked_loss(student, teacher, probe_every=0)
    correct = images = 0
    entropies = []
    for step, (x, y) in enumerate(batches(3)):
        target = y
        if soft_targets:  # a mixup-style target whose dominant class is y
            target = F.one_hot(y, NUM_CLASSES).float() * 0.7 + F.one_hot(y.roll(1), NUM_CLASSES).float() * 0.3
        crit(x, student.train()(x), target)
        logits = hand_logits(teacher, x, crit.last_keep_idx)
        correct += int((logits.argmax(1) == y).sum())
        images += x.shape[0]
        entropies.append(entropy(logits))
    stats = crit.pop_stats()
    assert stats["teacher_acc1"] == pytest.approx(100.0 * correct / images)
    assert stats["teacher_entropy"] == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)
    assert stats["teacher_patch_share"] == 0.5 and stats["teacher_prefix_tokens"] == 1
    assert "probe_images" not in stats  # probe_every=0: no probe
    assert crit.pop_stats().get("teacher_acc1") is None  # popped: the next epoch starts from nothing


def test_probe_figures_and_cost_equal_a_hand_computation():
    student, teacher = tiny(seed=1), tiny(seed=2)
    crit = masked_loss(student, teacher, probe_every=2, probe_images=3)
    probe_rng = torch.Generator().manual_seed(0)  # the probe's own generator (seed 0), drawn once per probe
    agree_mask, agree_random, correct, kls = 0, 0, [0, 0, 0], [0.0, 0.0]
    probed = 0
    for step, (x, y) in enumerate(batches(4)):
        crit(x, student.train()(x), y)
        if step % 2 == 1:  # steps 2 and 4 (counted from 1) probe
            few, labels = x[:3], y[:3]
            random_keep = torch.rand(3, 16, generator=probe_rng).topk(8, dim=1).indices.sort(1).values
            full = hand_logits(teacher, few)
            chosen = hand_logits(teacher, few, crit.last_keep_idx[:3])
            random = hand_logits(teacher, few, random_keep)
            agree_mask += int((chosen.argmax(1) == full.argmax(1)).sum())
            agree_random += int((random.argmax(1) == full.argmax(1)).sum())
            correct = [c + int((z.argmax(1) == labels).sum()) for c, z in zip(correct, (full, chosen, random))]
            kls = [kls[0] + kl(full, chosen) * 3, kls[1] + kl(full, random) * 3]
            probed += 3
    # cost: a full pass (16 patches + class token) and a random-mask pass (8 + 1) on 3 images, twice
    assert crit.masked_teacher.meter.probe_tokens == 2 * 3 * ((16 + 1) + (8 + 1))
    stats = crit.pop_stats()
    assert stats["probe_images"] == probed == 6
    assert stats["probe_agree_mask"] == pytest.approx(100.0 * agree_mask / probed)
    assert stats["probe_agree_random"] == pytest.approx(100.0 * agree_random / probed)
    assert stats["probe_kl_mask"] == pytest.approx(kls[0] / probed, rel=1e-4, abs=1e-7)
    assert stats["probe_kl_random"] == pytest.approx(kls[1] / probed, rel=1e-4, abs=1e-7)
    for key, c in zip(("probe_acc1_full", "probe_acc1_mask", "probe_acc1_random"), correct):
        assert stats[key] == pytest.approx(100.0 * c / probed)


@pytest.mark.parametrize("batch,patches,kept,prefix", [(64, 64, 32, 1), (128, 196, 98, 1), (256, 196, 49, 5)])
def test_default_probe_interval_keeps_it_within_one_percent(batch, patches, kept, prefix):
    probe = FidelityProbe()
    every = probe.interval(batch=batch, patches=patches, kept=kept, prefix=prefix)
    probe_tokens = 8 * ((patches + prefix) + (kept + prefix))
    step_tokens = batch * (kept + prefix)
    assert probe_tokens / (every * step_tokens) <= 0.01  # within budget ...
    assert probe_tokens / ((every - 1) * step_tokens) > 0.01 if every > 1 else True  # ... and not needlessly rare
    assert every == math.ceil(probe_tokens / (0.01 * step_tokens))


# --- the guard: a criterion that keeps the blank half of every image ---------------------------------------------
def _fixed_half(right: bool):
    def select(*, scores, batch_size, num_patches, num_keep, device):
        side = int(num_patches ** 0.5)
        cols = torch.arange(num_patches, device=device) % side
        half = torch.nonzero((cols >= side // 2) if right else (cols < side // 2)).flatten()[:num_keep]
        return half.expand(batch_size, -1).clone()
    return select


@pytest.fixture
def half_criteria(monkeypatch):
    # 'blank': the right half, where the images below carry nothing; 'content': the left half, where they do.
    monkeypatch.setitem(masking.MASK_MODES, "blank", (_fixed_half(right=True), None))
    monkeypatch.setitem(masking.MASK_MODES, "content", (_fixed_half(right=False), None))


def pooling_teacher():
    """A teacher whose prediction depends on its patches' content: it averages them (timm's global_pool='avg')."""
    teacher = tiny(seed=2, depth=1, global_pool="avg")
    with torch.no_grad():
        teacher.patch_embed.proj.weight.mul_(5)
        teacher.head.weight.mul_(20)
    return teacher


def run_steps(crit, student, steps=10, seed=0):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches(steps, batch=8, seed=seed, blank_right=True):
            crit(x, student.train()(x), y)
    return [w for w in caught if issubclass(w.category, MaskGuardWarning)]


def test_guard_fires_on_the_blank_half_and_not_on_random_or_the_content_half(half_criteria):
    student = tiny(seed=1)
    fired = {}
    for mode in ("blank", "random", "content"):
        crit = masked_loss(student, pooling_teacher(), mask_mode=mode, probe_every=1, probe_images=8)
        fired[mode] = run_steps(crit, student)
        stats = crit.pop_stats()
        assert stats["mask_guard_fired"] == float(bool(fired[mode]))
        if mode == "blank":
            assert stats["probe_agree_mask"] + 10 <= stats["probe_agree_random"]
        crit.remove_hooks()
    assert len(fired["blank"]) == 1 and not fired["random"] and not fired["content"]
    message = str(fired["blank"][0].message)
    assert "mask_mode='blank'" in message and "random mask" in message and "mask_guard='fallback'" in message
    assert "%" in message  # the numbers, not just a verdict


def test_guard_off_says_nothing(half_criteria):
    student = tiny(seed=1)
    crit = masked_loss(student, pooling_teacher(), mask_mode="blank", probe_every=1, mask_guard="off")
    assert not run_steps(crit, student)
    assert crit.pop_stats()["mask_guard_fired"] == 0


def test_fallback_switches_what_the_teacher_sees_and_resume_keeps_it(half_criteria):
    student = tiny(seed=1)
    crit = masked_loss(student, pooling_teacher(), mask_mode="blank", probe_every=1, mask_guard="fallback")
    blank = _fixed_half(right=True)(scores=None, batch_size=8, num_patches=16, num_keep=8, device="cpu")
    assert run_steps(crit, student, steps=8)  # a clear case: the guard fires and switches within 8 probes
    state = crit.guard_state()
    assert state["switched"]["from"] == "blank" and state["switched"]["to"] == "random"
    assert crit.masked_teacher.mask_mode == "random"
    x, y = next(iter(batches(1, batch=8, seed=5, blank_right=True)))
    crit(x, student(x), y)
    assert not torch.equal(crit.last_keep_idx, blank)  # random patches now, no longer the blank half

    resumed = masked_loss(student, pooling_teacher(), mask_mode="blank", probe_every=1, mask_guard="fallback")
    resumed.load_guard_state(state)  # what a checkpoint restores
    assert resumed.masked_teacher.mask_mode == "random" and resumed.guard_state()["switched"] == state["switched"]
    resumed(x, student(x), y)
    assert not torch.equal(resumed.last_keep_idx, blank)


@pytest.mark.parametrize("bad", [dict(mask_guard="loud"), dict(guard_fallback="teacher"), dict(probe_every=-1),
                                 dict(probe_every=1.5), dict(probe_images=0)])
def test_bad_guard_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        masked_loss(tiny(seed=1), tiny(seed=2), **bad)


def test_timm_task_gets_the_same_guard_and_its_checkpoint_keeps_the_switch(half_criteria):
    timm_task = pytest.importorskip("deit_patch.timm_task")
    if not timm_task.has_logit_task:
        pytest.skip("this timm has no timm.task.LogitDistillationTask (timm < 1.0.23)")
    student = tiny(seed=1)

    def task():
        return timm_task.MaskedLogitDistillationTask(student, pooling_teacher(), criterion=nn.CrossEntropyLoss(),
                                                     keep_ratio=0.5, mask_mode="blank", mask_guard="fallback",
                                                     probe_every=1, verbose=False).train()

    first = task()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches(8, batch=8, blank_right=True):
            first(x, y)
    assert any(issubclass(w.category, MaskGuardWarning) for w in caught)
    stats = first.pop_stats()
    assert stats["mask_guard_fired"] == 1 and "teacher_acc1" in stats  # labels reach the teacher through timm
    assert first.masked_teacher.mask_mode == "random"
    state = first.get_task_state()
    resumed = task()
    resumed.load_task_state(state)
    assert resumed.masked_teacher.mask_mode == "random"
    assert resumed.masked_teacher.guard_state()["switched"]["from"] == "blank"


def _probe_row(n, mask, random, both):
    # images, agree_mask, agree_random, agree_both, kl_mask, kl_random, labelled, correct_full/mask/random
    return quality_row([n, mask, random, both, 1.0, 0.5, 0, 0, 0, 0])


def quality_row(values):
    from deit_patch.quality import ProbeResult
    return ProbeResult(torch.tensor(values, dtype=torch.float64))


@pytest.mark.parametrize("rows,fires", [
    ([(8, 1, 7, 1), (8, 1, 7, 1)], True),     # 16 images, 12.5% vs 87.5%: clear at once
    ([(8, 1, 7, 1)], False),                  # 8 images: fewer than min_images, no verdict yet
    ([(8, 4, 5, 4)] * 8, False),              # 50% vs 62.5% on 64 images: a gap within noise
    ([(8, 3, 6, 3)] * 8, True),               # 37.5% vs 75% on 64 images: beyond 10 points with 3 SE to spare
    ([(8, 2, 2, 2)] * 8, True),               # random no better, but the chosen mask far from the full teacher
])
def test_guard_rule_is_a_paired_test_written_out(rows, fires):
    from deit_patch.quality import MaskGuard
    guard = MaskGuard()
    verdicts = [guard.check(_probe_row(*r), reduce=lambda t: t) for r in rows]
    n = sum(r[0] for r in rows[-8:])
    m, r_, b = (sum(row[i] for row in rows[-8:]) / n for i in (1, 2, 3))
    gap = r_ - m
    gap_se = math.sqrt(max(r_ + m - 2 * b - gap ** 2, 0) / n)
    expected = n >= 16 and (gap - 3 * gap_se >= 0.10 or m + 3 * math.sqrt(m * (1 - m) / n) < 0.5)
    assert (verdicts[-1] is not None) == expected == fires
