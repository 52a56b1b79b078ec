"""The plugin on whatever timm is importable (CI runs this folder under 0.4.12, 0.9.16 and the current timm).

Every model family a DeiT user meets, as teacher and as student: timm's vit_*/deit_*, deit_*_distilled, deit3_*
(where this timm has it), cait_*, and look-alikes of DeiT's own models.py, models_v2.py and cait_models.py
(tests/plugin/lookalikes.py). Values are compared with forwards and formulas written out here, per architecture,
never with the plugin's own code. A model this timm lacks is skipped, saying so.
"""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymodels import NUM_CLASSES, tiny
from deit_patch.capture import AttentionCapture, CaptureError
from deit_patch.teachers import UnsupportedTeacherError, find_family, pruned_forward, verify_family
from losses import DistillationLoss, MaskedDistillationLoss
from lookalikes import LOOKALIKES, RepoDistilled
from lookalikes import build as build_lookalike

TIMM_NAMES = {"deit": "deit_tiny_patch16_224", "vit": "vit_small_patch16_224",
              "deit_distilled": "deit_tiny_distilled_patch16_224", "deit3": "deit3_small_patch16_224",
              "cait": "cait_xxs24_224"}
DISTILLED = {"deit_distilled", "repo_distilled"}       # class + distillation token, mean of two heads in eval
PATCH_POS_ONLY = {"deit3", "own_deit3"}                # position embedding on patches only, class token after
CAIT = {"cait", "own_cait"}                            # class token only in the final class-attention blocks
FAMILY = {"deit": "vit", "vit": "vit", "deit_distilled": "vit", "deit3": "vit", "cait": "cait",
          "repo_distilled": "deit_repo_distilled", "own_deit3": "own_vit", "own_cait": "cait"}
TEACHERS = list(FAMILY)
STUDENTS = [k for k in FAMILY if k not in CAIT]
PATCHES, KEEP, BATCH = 16, 8, 4  # 32 px images, patch 8


def make(kind: str, seed: int = 0) -> nn.Module:
    if kind in LOOKALIKES:
        return build_lookalike(kind, seed=seed)
    name = TIMM_NAMES[kind]
    if not timm.list_models(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    model = tiny(name, seed=seed, **({"depth_token_only": 1} if kind == "cait" else {}))
    with torch.no_grad():  # timm < 0.6 zero-initialises classifier heads: give the comparisons real logits
        for head in (model.head, getattr(model, "head_dist", None)):
            if isinstance(head, nn.Linear):
                head.weight.normal_(0, 0.2)
        for pname, param in model.named_parameters():  # CaiT's 1e-5 layer scale would hide which patches ran
            if kind in CAIT and pname.split(".")[-1] in ("gamma_1", "gamma_2", "gamma"):
                param.fill_(0.5)
    return model


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STATS = {"vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}  # what timm states for vit_small_patch16_224, on every version


def teacher_view(x: torch.Tensor, teacher_kind: str, student_kind: str) -> torch.Tensor:
    """The batch as the teacher expects it: DeiT's look-alikes state no statistics, so they share the student's."""
    student = STATS.get(student_kind, None if student_kind in LOOKALIKES else IMAGENET) or IMAGENET
    teacher = STATS.get(teacher_kind, None if teacher_kind in LOOKALIKES else IMAGENET) or student
    (ms, ss), (mt, st) = ([torch.tensor(v).view(1, 3, 1, 1) for v in pair] for pair in (student, teacher))
    return (x * ss + ms - mt) / st


def data(seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


def pick(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.stack([tokens[b, keep[b]] for b in range(tokens.shape[0])])


def assert_extras_are_identities(model: nn.Module) -> None:
    # The hand forwards skip these modules; they must do nothing for these models in eval on this timm version.
    for name in ("pre_logits", "fc_norm", "norm_pre", "head_drop", "patch_drop"):
        module = getattr(model, name, None)
        assert module is None or isinstance(module, (nn.Identity, nn.Dropout)), (name, module)


def hand_teacher(kind: str, model: nn.Module, x: torch.Tensor, keep) -> torch.Tensor:
    """The teacher's eval forward written out per architecture, on the patches in ``keep`` (None: all)."""
    assert_extras_are_identities(model)
    n = x.shape[0]
    patches = model.patch_embed(x)
    if kind in CAIT:
        tokens = patches + model.pos_embed
        tokens = tokens if keep is None else pick(tokens, keep)
        for block in model.blocks:
            tokens = block(tokens)
        cls = model.cls_token.expand(n, -1, -1)
        for block in model.blocks_token_only:
            cls = block(tokens, cls)
        return model.head(model.norm(torch.cat([cls, tokens], 1))[:, 0])
    prefix = [model.cls_token.expand(n, -1, -1)] + ([model.dist_token.expand(n, -1, -1)] if kind in DISTILLED else [])
    if kind in PATCH_POS_ONLY:
        tokens = torch.cat(prefix + [patches + model.pos_embed], 1)
    else:
        tokens = torch.cat(prefix + [patches], 1) + model.pos_embed
    p = len(prefix)
    if keep is not None:
        tokens = torch.cat([tokens[:, :p], pick(tokens[:, p:], keep)], 1)
    for block in model.blocks:
        tokens = block(tokens)
    tokens = model.norm(tokens)
    if kind in DISTILLED:
        return (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
    return model.head(tokens[:, 0])


def random_keep(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(PATCHES, generator=g)[:KEEP] for _ in range(BATCH)])


class LastBlockInput:
    """Records the input of a student's last attention block, to recompute its class-token attention by hand."""

    def __init__(self, model: nn.Module):
        self.block = list(model.blocks)[-1]
        self.handle = self.block.register_forward_pre_hook(self)
        self.inputs = None

    def __call__(self, module, args):
        self.inputs = args[0].detach()

    def scores(self, prefix: int) -> torch.Tensor:
        attn = self.block.attn
        y = self.block.norm1(self.inputs)
        n, t, c = y.shape
        q, k, _ = attn.qkv(y).view(n, t, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) * (c // attn.num_heads) ** -0.5, dim=-1)
        return weights.mean(1)[:, 0, prefix:]


def student_outputs(kind: str, student: nn.Module, x: torch.Tensor, distilled_training: bool):
    if distilled_training and hasattr(student, "set_distilled_training"):  # timm >= 0.6; before, always a pair
        student.set_distilled_training(True)
    student.train()
    return student(x)


@pytest.mark.parametrize("kind", TEACHERS)
def test_pruned_teacher_equals_hand_forward(kind):
    model = make(kind).eval()
    x, _ = data()
    assert find_family(model).name == FAMILY[kind]
    keep = random_keep()
    with torch.no_grad():
        plain = model(x)
        torch.testing.assert_close(pruned_forward(model, x, None), plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hand_teacher(kind, model, x, None), plain, rtol=1e-5, atol=1e-5)
        got = pruned_forward(model, x, keep)
        torch.testing.assert_close(got, hand_teacher(kind, model, x, keep), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)
    verify_family(model, find_family(model))  # the construction-time check accepts every supported family


def test_misdescribed_teacher_is_refused_at_construction():
    class ClassHeadOnly(RepoDistilled):  # looks like models.py's distilled ViT but answers with one head
        def forward(self, x):
            return self.head(self.forward_features(x)[0])

    torch.manual_seed(0)
    teacher = ClassHeadOnly()
    with pytest.raises(UnsupportedTeacherError, match="does not reproduce its own eval-mode output"):
        MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=make("deit"),
                               keep_ratio=0.5)


@pytest.mark.parametrize("kind", STUDENTS)
def test_student_scores_equal_explicit_softmax(kind):
    student = make(kind, seed=1)
    x, _ = data()
    capture, recorder = AttentionCapture(student), LastBlockInput(student)
    try:
        student.train()
        student(x)
        want = recorder.scores(prefix=2 if kind in DISTILLED else 1)
        torch.testing.assert_close(capture.take(BATCH), want, rtol=1e-5, atol=1e-6)
    finally:
        capture.remove()
        recorder.handle.remove()


@pytest.mark.parametrize("kind", sorted(CAIT))
def test_cait_student_attention_refused_random_mask_works(kind):
    student, teacher = make(kind, seed=1), make("deit", seed=2)
    with pytest.raises(CaptureError, match="CaiT"):
        MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=0.5)
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 2.0, student=student,
                                  keep_ratio=0.5, mask_mode="random")
    x, y = data()
    out = student_outputs(kind, student, x, False)
    loss = crit(x, out, y)
    with torch.no_grad():
        t = hand_teacher("deit", teacher.eval(), x, crit.last_keep_idx)
    kd = F.kl_div(F.log_softmax(out / 2.0, 1), F.softmax(t / 2.0, 1), reduction="sum") * 4.0 / out.numel()
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(out, y) + 0.5 * kd, rtol=1e-5, atol=1e-6)


def hand_loss(kind_type: str, out, t_logits, y, alpha: float, tau: float) -> torch.Tensor:
    cls_out, kd_out = out if isinstance(out, tuple) else (out, out)
    if kind_type == "hard":
        kd = F.cross_entropy(kd_out, t_logits.argmax(1))
    else:  # DeiT's: KL(teacher || student) summed, times tau^2, over the number of logits
        kd = F.kl_div(F.log_softmax(kd_out / tau, 1), F.softmax(t_logits / tau, 1), reduction="sum") \
            * tau * tau / kd_out.numel()
    return (1 - alpha) * F.cross_entropy(cls_out, y) + alpha * kd


def check_masked_loss(teacher_kind: str, student_kind: str, dist_type: str, distilled_training: bool):
    teacher, student = make(teacher_kind, seed=2), make(student_kind, seed=1)
    alpha, tau = 0.4, 2.0
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, dist_type, alpha, tau, student=student,
                                  keep_ratio=0.5)
    recorder = LastBlockInput(student)
    x, y = data()
    try:
        out = student_outputs(student_kind, student, x, distilled_training)
        assert isinstance(out, tuple) == distilled_training
        loss = crit(x, out, y)
    finally:
        recorder.handle.remove()
        crit.remove_hooks()
    scores = recorder.scores(prefix=2 if student_kind in DISTILLED else 1)
    keep = scores.topk(KEEP, dim=1).indices.sort(dim=1).values
    assert torch.equal(crit.last_keep_idx.cpu(), keep)
    with torch.no_grad():
        t_logits = hand_teacher(teacher_kind, teacher.eval(), teacher_view(x, teacher_kind, student_kind), keep)
    torch.testing.assert_close(loss, hand_loss(dist_type, out, t_logits, y, alpha, tau), rtol=1e-5, atol=1e-6)
    prefix = 0 if teacher_kind in CAIT else 2 if teacher_kind in DISTILLED else 1
    assert crit.meter.tokens == BATCH * (prefix + KEEP)  # 2 prefix tokens for a distilled teacher on every timm


@pytest.mark.parametrize("dist_type", ["soft", "hard"])
@pytest.mark.parametrize("teacher_kind", TEACHERS)
def test_every_teacher_family_masked_loss_equals_hand_formula(teacher_kind, dist_type):
    check_masked_loss(teacher_kind, "deit", dist_type, distilled_training=False)


@pytest.mark.parametrize("dist_type", ["soft", "hard"])
@pytest.mark.parametrize("student_kind", STUDENTS)
def test_every_student_family_masked_loss_equals_hand_formula(student_kind, dist_type):
    # A distilled student (timm's or models.py's) trains with its class and distillation heads, as in DeiT.
    check_masked_loss("deit_distilled", student_kind, dist_type, distilled_training=student_kind in DISTILLED)


def test_teacher_statistics_come_from_this_timms_config():
    # timm's vit_small_patch16_224 states mean = std = 0.5 (pretrained_cfg, or default_cfg before timm 0.6), DeiT's
    # students ImageNet's: the teacher must get the batch re-normalised, on every timm.
    teacher, student = make("vit", seed=2), make("deit", seed=1)
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 1.0, 1.0, student=student)
    x, y = data()
    out = student_outputs("deit", student, x, False)
    loss = crit(x, out, y)
    mean_s = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std_s = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x_teacher = (x * std_s + mean_s - 0.5) / 0.5
    assert crit.masked_teacher.renorm is not None and crit.masked_teacher.renorm.active
    with torch.no_grad():
        t_logits = hand_teacher("vit", teacher.eval(), x_teacher, crit.last_keep_idx)
    torch.testing.assert_close(loss, hand_loss("soft", out, t_logits, y, 1.0, 1.0), rtol=1e-5, atol=1e-6)


def test_num_keep_alone_is_enough():
    teacher, student = make("deit", seed=2), make("deit", seed=1)
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, num_keep=5)
    x, y = data()
    crit(x, student_outputs("deit", student, x, False), y)
    assert crit.masking and tuple(crit.last_keep_idx.shape) == (BATCH, 5)


@pytest.mark.parametrize("kind", ["deit", "deit_distilled", "cait"])
def test_unmasked_token_count(kind):
    crit = DistillationLoss(nn.CrossEntropyLoss(), make(kind, seed=2), "soft", 0.5, 1.0)
    x, y = data()
    crit(x, torch.randn(BATCH, NUM_CLASSES), y)
    prefix = {"deit": 1, "deit_distilled": 2, "cait": 0}[kind]
    assert crit.meter.tokens == BATCH * (prefix + PATCHES)


def test_cnn_teacher_with_masking_is_unsupported():
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES)
    with pytest.raises(UnsupportedTeacherError, match="keep_ratio=1.0"):
        MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=make("deit"),
                               keep_ratio=0.5)
