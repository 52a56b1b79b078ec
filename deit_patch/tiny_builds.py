"""Small random-weight builds of every timm model family, for probing what the plugin can do with each.

One entry per family (``module.Class``, as ``coverage`` names them): a model name of that family, the constructor
arguments that shrink it (a few blocks, a few channels) and an input size it accepts. The arguments are applied
where timm's entrypoint hands them to ``build_model_with_cfg``, so they win over what the entrypoint fixes, as a
timm >= 0.9 entrypoint lets ``timm.create_model`` kwargs win. Written against timm 1.0.31; on another timm a
build may fail, and callers report that instead of guessing. ``slow`` marks the few families whose smallest build
still holds tens of millions of weights (kept out of the default test sweep).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Union

import torch
import torch.nn as nn

Overrides = Union[Dict[str, Any], Callable[[], Dict[str, Any]]]


@dataclass(frozen=True)
class TinyBuild:
    model: str                      # a timm model name of the family
    overrides: Overrides = field(default_factory=dict)   # constructor arguments (or a function making them)
    img: int = 32                   # square input size the build accepts
    slow: bool = False              # > ~10M weights even at its smallest

    def kwargs(self) -> Dict[str, Any]:
        return dict(self.overrides() if callable(self.overrides) else self.overrides)


def _vit(**extra: Any) -> Dict[str, Any]:
    return dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **extra)


def _mvit() -> Dict[str, Any]:
    from timm.models.mvitv2 import MultiScaleVitCfg
    return dict(img_size=(64, 64), model_cfg=MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=8, num_heads=1))


def _vitamin() -> Dict[str, Any]:
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vitamin import MbConvStages, VitCfg, VitConvCfg
    stem = MbConvStages(cfg=VitCfg(embed_dim=(8, 16, 32), depths=(1, 1, 1), stem_width=8, head_type="1d",
                                   conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6)))
    return dict(img_size=64, embed_dim=32, depth=2, num_heads=2, embed_layer=partial(HybridEmbed, backbone=stem,
                                                                                     proj=False))


_HIERA = dict(img_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), mask_unit_size=(4, 4),
              global_pos_size=(2, 2), q_pool=2)  # 2 poolings of a 4 x 4 unit: any whole number of units masks
_GEMMA = dict(img_size=48, patch_size=8, embed_dim=32, depth=2, num_heads=2, head_dim=16, intermediate_size=64,
              position_embedding_size=64)
_QWEN = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, pos_embed_grid_size=4)
_LEVIT = dict(img_size=64, embed_dim=(16, 16, 32), key_dim=4, depth=(1, 1, 1), num_heads=(2, 2, 2))
_EFFVIM = dict(embed_dim=(16, 16, 32), depths=(1, 1, 1), state_dim=(4, 4, 4))
_SWIN = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)

TINY_BUILDS: Dict[str, TinyBuild] = {
    # patch-token ViTs (maskable families first)
    "vision_transformer.VisionTransformer": TinyBuild("vit_tiny_patch16_224", _vit()),
    "deit.VisionTransformer": TinyBuild("deit_tiny_patch16_224", _vit()),
    "deit.VisionTransformerDistilled": TinyBuild("deit_tiny_distilled_patch16_224", _vit()),
    "vision_transformer_hybrid.VisionTransformer": TinyBuild("vit_tiny_r_s16_p8_224",
                                                             dict(img_size=64, embed_dim=32, depth=2, num_heads=2),
                                                             img=64),
    "vitamin.VisionTransformer": TinyBuild("vitamin_small_224", _vitamin, img=64),
    "cait.Cait": TinyBuild("cait_xxs24_224", _vit(depth_token_only=1)),
    "eva.Eva": TinyBuild("eva02_tiny_patch14_224", _vit()),
    "beit.Beit": TinyBuild("beit_base_patch16_224", _vit(use_rel_pos_bias=True)),
    "vision_transformer_relpos.VisionTransformerRelPos": TinyBuild("vit_relpos_small_patch16_224", _vit()),
    "naflexvit.NaFlexVit": TinyBuild("naflexvit_base_patch16_gap", _vit()),
    "hiera.Hiera": TinyBuild("hiera_tiny_224", _HIERA, img=64),
    # token models with another layout
    "convit.ConVit": TinyBuild("convit_tiny", _vit(local_up_to_layer=1)),
    "crossvit.CrossVit": TinyBuild("crossvit_tiny_240", dict(img_size=32, patch_size=(8, 16), embed_dim=(16, 32),
                                                             depth=((1, 1, 0),), num_heads=(2, 2),
                                                             img_scale=(1.0, 1.0))),
    "deepseek_vit.DeepseekVitClassifier": TinyBuild("deepseek_vit_412m", _vit()),
    "deepseek_vit.DeepseekVitEncoder": TinyBuild("deepseek_vit_412m_enc", _vit()),
    "gemma4_vit.Gemma4VitClassifier": TinyBuild("gemma4_vit_570m", _GEMMA, img=48),
    "gemma4_vit.Gemma4VitEncoder": TinyBuild("gemma4_vit_167m_enc", _GEMMA, img=48),
    "qwen3_vit.Qwen3VitClassifier": TinyBuild("qwen3_vit_88m", _QWEN),
    "qwen3_vit.Qwen3VitEncoder": TinyBuild("qwen3_vit_88m_enc", _QWEN),
    "mlp_mixer.MlpMixer": TinyBuild("mixer_s16_224", dict(img_size=32, patch_size=8, num_blocks=2, embed_dim=32)),
    "tnt.TNT": TinyBuild("tnt_s_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, inner_dim=8, depth=2,
                                                   num_heads_outer=2, num_heads_inner=1)),
    "vision_transformer_sam.VisionTransformerSAM": TinyBuild("samvit_base_patch16", _vit(
        window_size=2, neck_chans=16, global_attn_indexes=(1,))),
    "volo.VOLO": TinyBuild("volo_d1_224", dict(img_size=32, layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32),
                                               num_heads=(1, 2, 2, 2), stem_hidden_dim=8)),
    "xcit.Xcit": TinyBuild("xcit_nano_12_p16_224", _vit(cls_attn_layers=1)),
    "coat.CoaT": TinyBuild("coat_lite_tiny", dict(img_size=32, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1),
                                                  num_heads=8, patch_size=4)),
    "pit.PoolingVisionTransformer": TinyBuild("pit_ti_224", dict(img_size=32, patch_size=8, stride=4,
                                                                 base_dims=(16, 16), depth=(1, 1), heads=(1, 2))),
    "nest.Nest": TinyBuild("nest_tiny", dict(img_size=32, embed_dims=(16, 16, 32), num_heads=(1, 1, 2),
                                             depths=(1, 1, 1))),
    "twins.Twins": TinyBuild("twins_pcpvt_small", dict(embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1),
                                                       num_heads=(1, 1, 2, 2))),
    "pvt_v2.PyramidVisionTransformerV2": TinyBuild("pvt_v2_b0", dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 32),
                                                                     num_heads=(1, 1, 2, 2))),
    "mvitv2.MultiScaleVit": TinyBuild("mvitv2_tiny", _mvit, img=64),
    "hieradet_sam2.HieraDet": TinyBuild("hieradet_small", dict(embed_dim=8, num_heads=1, stages=(1, 1, 1, 1),
                                                               global_att_blocks=(), window_spec=(8, 4, 14, 7)),
                                        img=224),
    "swin_transformer.SwinTransformer": TinyBuild("swin_tiny_patch4_window7_224", _SWIN),
    "swin_transformer_v2.SwinTransformerV2": TinyBuild("swinv2_tiny_window8_256", _SWIN),
    "swin_transformer_v2_cr.SwinTransformerV2Cr": TinyBuild("swinv2_cr_tiny_224", dict(_SWIN, img_size=(32, 32))),
    "maxxvit.MaxxVit": TinyBuild("test_maxvit", dict(img_size=64), img=64),
    "davit.DaVit": TinyBuild("davit_tiny", dict(depths=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32),
                                                num_heads=(1, 1, 2, 2), window_size=2)),
    "focalnet.FocalNet": TinyBuild("focalnet_tiny_srf", dict(embed_dim=8, depths=(1, 1, 1, 1))),
    "gcvit.GlobalContextVit": TinyBuild("gcvit_xxtiny", dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
                                        img=224),
    "tiny_vit.TinyVit": TinyBuild("tiny_vit_5m_224", dict(embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1),
                                                          num_heads=(1, 1, 2, 2), window_sizes=(2, 2, 2, 1)), img=64),
    "levit.Levit": TinyBuild("levit_512", _LEVIT, img=64),
    "levit.LevitDistilled": TinyBuild("levit_128", _LEVIT, img=64),
    "efficientformer.EfficientFormer": TinyBuild("efficientformer_l1", dict(depths=(1, 1, 1, 2),
                                                                            embed_dims=(8, 16, 16, 32), num_vit=1),
                                                  img=224),
    "efficientformer_v2.EfficientFormerV2": TinyBuild("efficientformerv2_s0", dict(
        depths=(1, 1, 2, 2), embed_dims=(8, 16, 16, 32), num_vit=1, img_size=64), img=64),
    "efficientvit_mit.EfficientVit": TinyBuild("efficientvit_b0", dict(widths=(8, 8, 16, 16, 32), depths=(1,) * 5,
                                                                       head_widths=(32, 32), head_dim=8)),
    "efficientvit_mit.EfficientVitLarge": TinyBuild("efficientvit_l1", dict(widths=(8, 8, 16, 16, 32), depths=(1,) * 5,
                                                                            head_widths=(32, 32), head_dim=8)),
    "efficientvit_msra.EfficientVitMsra": TinyBuild("efficientvit_m0", dict(
        img_size=64, embed_dim=(16, 16, 32), key_dim=(4, 4, 4), depth=(1, 1, 1), num_heads=(2, 2, 2),
        window_size=(2, 2, 2)), img=64),
    "efficientvim.EfficientViM": TinyBuild("efficientvim_m1", _EFFVIM, img=64),
    "efficientvim.EfficientViMDistilled": TinyBuild("efficientvim_m1_dist", _EFFVIM, img=64),
    "shvit.SHViT": TinyBuild("shvit_s1", dict(embed_dim=(16, 32, 32), partial_dim=(4, 8, 8), qk_dim=(4, 4, 4),
                                              depth=(1, 1, 1)), img=64),
    "sequencer.Sequencer2d": TinyBuild("sequencer2d_s", dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 16, 16),
                                                             hidden_sizes=(4, 8, 8, 8))),
    "visformer.Visformer": TinyBuild("visformer_tiny", dict(img_size=32, init_channels=8, embed_dim=32,
                                                            depth=(1, 1, 1), num_heads=2)),
    "nextvit.NextViT": TinyBuild("nextvit_small", {}, slow=True),
    "iformer.IFormer": TinyBuild("iformer_t", dict(dims=(8, 16, 32, 32), depths=(1, 1, 3, 3),
                                                   attn_groups=(0, 0, 1, 1))),
    "csatv2.CSATv2": TinyBuild("csatv2", dict(dims=(8, 16, 16, 32), depths=(1, 1, 1, 1),
                                              transformer_depths=(0, 0, 1, 1)), img=64),
    "fastvit.FastVit": TinyBuild("fastvit_t8", dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 16, 32))),
    "metaformer.MetaFormer": TinyBuild("poolformer_s12", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32))),
    "mobilevit.ByobNet": TinyBuild("mobilevit_xxs", {}, img=64),
    "byoanet.ByobNet": TinyBuild("lambda_resnet26t", {}, img=64),
    "edgenext.EdgeNeXt": TinyBuild("edgenext_xx_small", dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                                             heads=(2, 2, 2, 2))),
    "lowformer.LowFormer": TinyBuild("lowformer_e1", dict(width_list=(8, 8, 16, 16, 32), depth_list=(1,) * 5,
                                                          head_widths=(32, 32))),
    "cpubone.CPUBone": TinyBuild("cpubone_t0", dict(width_list=(8, 16, 16, 16, 16), depth_list=(1,) * 5,
                                                    head_widths=(32, 32))),
    # convolutional networks
    "byobnet.ByobNet": TinyBuild("test_byobnet"),
    "convmixer.ConvMixer": TinyBuild("convmixer_768_32", dict(dim=32, depth=2, patch_size=4, kernel_size=3)),
    "convnext.ConvNeXt": TinyBuild("test_convnext"),
    "cspnet.CspNet": TinyBuild("cs3darknet_focus_s"),
    "cspnext.CspNext": TinyBuild("cspnext_s"),
    "densenet.DenseNet": TinyBuild("densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1))),
    "dla.DLA": TinyBuild("dla34", dict(levels=(1, 1, 1, 1, 1, 1), channels=(8, 8, 8, 16, 16, 16))),
    "dpn.DPN": TinyBuild("dpn48b", dict(k_sec=(1, 1, 1, 1), inc_sec=(8, 8, 8, 8), k_r=16, groups=4,
                                        num_init_features=8)),
    "efficientnet.EfficientNet": TinyBuild("test_efficientnet"),
    "fasternet.FasterNet": TinyBuild("fasternet_t0", dict(embed_dim=8, depths=(1, 1, 1, 1), feature_dim=32)),
    "ghostnet.GhostNet": TinyBuild("ghostnet_050", dict(width=0.1)),
    "hardcorenas.MobileNetV3": TinyBuild("hardcorenas_a"),
    "hgnet.HighPerfGpuNet": TinyBuild("hgnetv2_b0"),
    "hrnet.HighResolutionNet": TinyBuild("hrnet_w18_small"),
    "inception_next.MetaNeXt": TinyBuild("inception_next_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32))),
    "inception_resnet_v2.InceptionResnetV2": TinyBuild("inception_resnet_v2", img=75, slow=True),
    "inception_v3.InceptionV3": TinyBuild("inception_v3", img=75, slow=True),
    "inception_v4.InceptionV4": TinyBuild("inception_v4", img=75, slow=True),
    "lcnetv2.LCNetV2": TinyBuild("lcnetv2_small", dict(scale=0.25, depths=(1, 1, 1, 1), head_hidden_size=32)),
    "mambaout.MambaOut": TinyBuild("test_mambaout"),
    "mobilenetv3.MobileNetV3": TinyBuild("mobilenetv3_small_050"),
    "mobilenetv5.MobileNetV5": TinyBuild("mobilenetv5_base", img=64, slow=True),
    "mobilenetv5.MobileNetV5Encoder": TinyBuild("mobilenetv5_300m_enc", img=64, slow=True),
    "nasnet.NASNetALarge": TinyBuild("nasnetalarge", dict(stem_size=24, num_features=96), img=64),
    "nfnet.NormFreeNet": TinyBuild("test_nfnet"),
    "pnasnet.PNASNet5Large": TinyBuild("pnasnet5large", img=64, slow=True),
    "rdnet.RDNet": TinyBuild("rdnet_tiny", dict(growth_rates=(8, 8, 8, 8), num_blocks_list=(1, 1, 1, 1),
                                                block_type=("Block",) * 4,
                                                is_downsample_block=(None, True, True, False),
                                                num_init_features=8)),
    "regnet.RegNet": TinyBuild("regnetx_002"),
    "repghost.RepGhostNet": TinyBuild("repghostnet_050", dict(width=0.1)),
    "repvit.RepVit": TinyBuild("repvit_m0_9", dict(embed_dim=(8, 16, 16, 32), depth=(1, 1, 1, 1))),
    "res2net.ResNet": TinyBuild("res2net50_14w_8s", dict(layers=(1, 1, 1, 1))),
    "resnest.ResNet": TinyBuild("resnest14d"),
    "resnet.ResNet": TinyBuild("test_resnet"),
    "resnetv2.ResNetV2": TinyBuild("resnetv2_18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 32))),
    "rexnet.RexNet": TinyBuild("rexnet_100", dict(width_mult=0.25, depth_mult=0.25)),
    "selecsls.SelecSls": TinyBuild("selecsls42", slow=True),
    "senet.SENet": TinyBuild("legacy_seresnet18", dict(layers=[1, 1, 1, 1])),
    "sknet.ResNet": TinyBuild("skresnet18", dict(layers=(1, 1, 1, 1))),
    "starnet.StarNet": TinyBuild("starnet_s1", dict(base_dim=8, depths=[1, 1, 1, 1])),
    "swiftformer.SwiftFormer": TinyBuild("swiftformer_xs", dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 16, 32])),
    "tresnet.TResNet": TinyBuild("tresnet_m", dict(layers=(1, 1, 1, 1), width_factor=0.5), img=64),
    "vgg.VGG": TinyBuild("vgg11", dict(model_cfg=[8, "M", 16, "M", 16, "M", 16, "M", 16, "M"], mlp_ratio=0.01)),
    "vovnet.VovNet": TinyBuild("ese_vovnet19b_slim"),
    "xception.Xception": TinyBuild("legacy_xception", img=71, slow=True),
    "xception_aligned.XceptionAligned": TinyBuild("xception41", slow=True),
}


def _builder_module(name: str):
    from timm.models import model_entrypoint
    return sys.modules[model_entrypoint(name).__module__]


@contextlib.contextmanager
def overriding(name: str, overrides: Dict[str, Any]) -> Iterator[None]:
    """While open, the entrypoint of model ``name`` builds with ``overrides`` on top of its own arguments."""
    module = _builder_module(name)
    original = getattr(module, "build_model_with_cfg", None)
    if original is None or not overrides:
        yield
        return

    def build(model_cls, variant, pretrained, *args, **kwargs):
        kwargs.update(overrides)
        return original(model_cls, variant, pretrained, *args, **kwargs)
    module.build_model_with_cfg = build
    try:
        yield
    finally:
        module.build_model_with_cfg = original


def build_tiny(entry: TinyBuild, *, num_classes: int = 10, seed: int = 0, **kwargs: Any) -> nn.Module:
    """``entry`` built with random weights (seeded), ``num_classes`` classes, in eval mode."""
    import timm
    torch.manual_seed(seed)
    with overriding(entry.model, {**entry.kwargs(), **kwargs}):
        model = timm.create_model(entry.model, pretrained=False, num_classes=num_classes)
    return model.eval()


def tiny_build(family: str) -> Optional[TinyBuild]:
    """The table's entry for ``family`` (``module.Class``), or None."""
    return TINY_BUILDS.get(family)
