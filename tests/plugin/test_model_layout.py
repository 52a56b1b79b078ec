"""layout.py: one verified answer (or None) per layout question, on real timm models and hand-made ones."""
import pytest
import timm
import torch
import torch.nn as nn

from tinymodels import NUM_CLASSES, tiny
from deit_patch import layout
from deit_patch.tiny_builds import TINY_BUILDS, build_tiny


def build(family: str):
    entry = TINY_BUILDS[family]
    if not timm.list_models(entry.model):
        pytest.skip(f"timm {timm.__version__} has no {entry.model}")
    try:
        return build_tiny(entry)
    except Exception as err:  # the table is written for timm 1.0.x
        pytest.skip(f"timm {timm.__version__} cannot build the tiny {family}: {err}")


def test_built_and_dynamic_grids():
    model = tiny("vit_small_patch16_224")
    assert layout.patch_grid(model) == (4, 4)
    assert layout.num_patches(model) == 16
    assert layout.patch_grid(model, (32, 32)) == (4, 4)
    assert layout.patch_grid(model, (48, 48)) is None  # a fixed-size ViT has no grid at another size
    try:
        dynamic = tiny("vit_small_patch16_224", dynamic_img_size=True)
    except TypeError:
        pytest.skip(f"timm {timm.__version__} has no dynamic_img_size")
    assert layout.patch_grid(dynamic, (48, 40)) == (6, 5)


def test_dynamic_img_pad_grid_counts_the_padded_row_and_column():
    try:
        model = tiny("vit_small_patch16_224", dynamic_img_size=True, dynamic_img_pad=True)
    except TypeError:
        pytest.skip(f"timm {timm.__version__} has no dynamic_img_pad")
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 36, 36))
    real = tokens.shape[1] - model.num_prefix_tokens  # what the model really produced: a padded 5 x 5 grid
    assert real == 25
    assert layout.patch_grid(model, (36, 36)) == (5, 5)


def test_masked_loss_keeps_patches_from_the_padded_grid():
    # The keep count per batch is taken on the padded grid; it used to floor (4 x 4 of a 5 x 5 grid).
    from losses import MaskedDistillationLoss
    try:
        teacher = tiny("vit_small_patch16_224", dynamic_img_size=True, dynamic_img_pad=True)
    except TypeError:
        pytest.skip(f"timm {timm.__version__} has no dynamic_img_pad")
    loss = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, keep_ratio=0.5, mask_mode="random",
                                  teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3, student_mean=(0.5,) * 3,
                                  student_std=(0.5,) * 3)
    assert loss.masked_teacher.keep_for((36, 36)) == ((5, 5), 12)  # round(0.5 * 25)
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 36, 36), torch.randint(0, NUM_CLASSES, (4,))
    loss(x, torch.randn(4, NUM_CLASSES), y)
    keep_idx = loss.last_step.keep_idx
    assert keep_idx.shape == (4, 12) and int(keep_idx.max()) >= 16 and int(keep_idx.max()) < 25  # all 25 patches


@pytest.mark.parametrize("family", ["vision_transformer_hybrid.VisionTransformer", "volo.VOLO"])
def test_input_channels_of_a_model_with_a_conv_stem(family):
    model = build(family)
    proj = getattr(model.patch_embed, "proj", None)
    assert proj is None or proj.in_channels != 3  # the projection sees the stem's channels, not the image's
    assert layout.input_channels(model) == 3


def test_input_channels_of_a_grayscale_vit_and_of_models_it_cannot_read():
    assert layout.input_channels(tiny("vit_small_patch16_224", in_chans=1)) == 1

    class Stem(nn.Module):  # no config and two convolutions in the patch embedding: the first one is not known
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 4, 4))
            self.patch_embed.proj = self.patch_embed[1]
    assert layout.input_channels(Stem()) is None
    assert layout.input_channels(nn.Sequential(nn.Linear(4, 4))) is None


def test_prefix_tokens_counts_present_tokens_and_checks_the_position_embedding():
    assert layout.prefix_tokens(tiny("vit_small_patch16_224")) == 1
    assert layout.prefix_tokens(tiny("deit_small_distilled_patch16_224")) == 2
    try:
        registers = tiny("vit_small_patch16_224", reg_tokens=3)
    except TypeError:
        pytest.skip(f"timm {timm.__version__} has no register tokens")
    assert layout.prefix_tokens(registers) == 4
    broken = tiny("vit_small_patch16_224")
    broken.pos_embed = nn.Parameter(torch.zeros(1, 16 + 3, broken.pos_embed.shape[-1]))  # 3 extra: fits no count
    assert layout.prefix_tokens(broken) is None


def test_class_token_is_read_only_by_token_pooling_heads():
    assert layout.class_token_is_read(tiny("vit_small_patch16_224")) is True
    try:
        avg = tiny("vit_small_patch16_224", global_pool="avg")
    except TypeError:
        pytest.skip(f"timm {timm.__version__} has no global_pool on its ViT")
    assert avg.cls_token is not None
    assert layout.class_token_is_read(avg) is False


def test_token_model_finds_the_vit_inside_a_wrapper():
    vit = tiny("vit_small_patch16_224")

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = vit
            self.extra = nn.Linear(10, 10)

    wrapper = Wrapper()
    assert layout.token_model(wrapper) is vit
    assert layout.token_model(wrapper, vit.blocks[-1].attn) is vit
    assert layout.token_model(vit) is vit
    assert layout.token_model(nn.Sequential(tiny("vit_small_patch16_224"), tiny("vit_small_patch16_224"))) is None
    assert layout.patch_grid(wrapper) is None  # the wrapper has no patch embedding of its own: ask its token model
    assert layout.patch_grid(layout.token_model(wrapper)) == (4, 4)
    assert layout.patch_grid(nn.Linear(3, 3)) is None


@pytest.mark.parametrize("family", ["crossvit.CrossVit", "mvitv2.MultiScaleVit", "pvt_v2."
                                    "PyramidVisionTransformerV2", "tiny_vit.TinyVit", "swin_transformer."
                                    "SwinTransformer", "efficientvit_mit.EfficientVit"])
def test_grid_questions_on_other_token_layouts_answer_or_say_none(family):
    model = build(family)
    grid = layout.patch_grid(model)  # never an AttributeError; a grid only where the embedding states one
    embed = getattr(model, "patch_embed", None)
    stated = getattr(embed, "grid_size", None) if not isinstance(embed, nn.ModuleList) else None
    assert grid == (tuple(int(v) for v in stated) if stated is not None else None)
    # RGB where the image meets one convolution the embedding names; EfficientViT's stem is a conv stack with no
    # first_conv in the embedding, so it cannot tell (None), never a wrong count.
    assert layout.input_channels(model) == (None if family == "efficientvit_mit.EfficientVit" else 3)


def test_xcit_grid_from_image_and_patch_size_matches_the_tokens_it_makes():
    model = build("xcit.Xcit")
    assert getattr(model.patch_embed, "grid_size", None) is None
    with torch.no_grad():
        tokens, (rows, cols) = model.patch_embed(torch.zeros(1, 3, 32, 32))
    assert layout.patch_grid(model) == (rows, cols) and tokens.shape[1] == rows * cols == layout.num_patches(model)
