"""The coverage command lists every timm family; a family timm adds later shows up in it instead of crashing it."""
import json
import sys
import types

import pytest
import timm
import torch
import torch.nn as nn

from deit_patch import coverage

try:  # timm >= 0.9 keeps the registry in _registry, older timm in registry
    from timm.models import _registry as registry
except ImportError:
    from timm.models import registry


class FakeConvNet(nn.Module):
    def __init__(self, num_classes: int = 1000, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class FakeTokens(nn.Module):
    """A token model with a patch embedding but none of the layouts a family knows (no grid_size)."""

    def __init__(self, num_classes: int = 1000, **kwargs):
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.Conv2d(16, 16, 1))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.num_heads = 2
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(tokens, tokens, tokens)[0].mean(1))


class FakeBroken(FakeConvNet):
    def forward(self, x):
        raise RuntimeError("this family's forward is broken")


@pytest.fixture
def fake_family():
    """Three model entrypoints in a module `fake_family`, registered as timm registers its own; removed after."""
    saved = {name: (value.copy() if hasattr(value, "copy") else None) for name, value in vars(registry).items()
             if isinstance(value, (dict, set))}
    module = types.ModuleType("fake_family")
    sys.modules["fake_family"] = module
    names = []
    for name, cls in (("fake_convnet", FakeConvNet), ("fake_tokens", FakeTokens), ("fake_broken", FakeBroken)):
        def entrypoint(pretrained=False, _cls=cls, **kwargs):
            return _cls(**kwargs)
        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__module__ = "fake_family"
        setattr(module, name, entrypoint)
        registry.register_model(entrypoint)
        names.append(name)
    yield names
    for name, value in saved.items():
        current = getattr(registry, name)
        current.clear()
        current.update(value)
    sys.modules.pop("fake_family", None)


def test_new_families_show_up_with_a_status(fake_family):
    assert set(fake_family) <= set(timm.list_models())
    rows = {row.family: row for row in coverage.coverage(fake_family)}
    assert set(rows) == {"fake_family.FakeConvNet", "fake_family.FakeTokens", "fake_family.FakeBroken"}
    assert rows["fake_family.FakeConvNet"].status == coverage.UNMASKED
    assert "convolutional network" in rows["fake_family.FakeConvNet"].detail
    assert rows["fake_family.FakeTokens"].status == coverage.UNMASKED
    assert "not described by a registered TeacherFamily" in rows["fake_family.FakeTokens"].detail
    assert rows["fake_family.FakeBroken"].status == coverage.REFUSED
    assert "forward is broken" in rows["fake_family.FakeBroken"].detail
    assert not any(row.tiny for row in rows.values())  # not in the table: built at the entrypoint's defaults


def test_the_command_writes_markdown_and_json(fake_family, tmp_path, capsys):
    md, js = tmp_path / "coverage.md", tmp_path / "coverage.json"
    assert coverage.main(["--family", "fake_family", "--markdown", str(md), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert sorted(row["family"] for row in rows) == ["fake_family.FakeBroken", "fake_family.FakeConvNet",
                                                      "fake_family.FakeTokens"]
    text = md.read_text()
    assert "3 model families, 2 unmasked-only, 1 refused" in text
    assert "| `fake_family.FakeBroken` | 1 | `fake_broken` | refused |" in text
    assert text in capsys.readouterr().out


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "vit_tiny_patch16_224", "resnet18"])
def test_family_of_names_the_class_timm_builds(name):
    if not timm.list_models(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    torch.manual_seed(0)
    built = timm.create_model(name, pretrained=False)
    assert coverage.family_of(name) == f"{module}.{type(built).__name__}"


def test_real_families_are_probed_on_their_tiny_builds():
    names = [n for n in ("eva02_tiny_patch14_224", "swin_tiny_patch4_window7_224", "resnet18", "beit_base_patch16_224")
             if timm.list_models(n)]
    rows = {row.family: row for row in coverage.coverage(names)}
    expected = {"eva.Eva": coverage.MASKED, "beit.Beit": coverage.MASKED,
                "swin_transformer.SwinTransformer": coverage.UNMASKED, "resnet.ResNet": coverage.UNMASKED}
    for family, row in rows.items():
        # A token family whose tiny build this timm cannot make is not judged here; a CNN needs no tiny build.
        if row.tiny or family == "resnet.ResNet":
            assert row.status == expected[family], (family, row.detail)
    if "swin_transformer.SwinTransformer" not in rows:
        pytest.skip(f"timm {timm.__version__} lists no Swin model probed here")
    assert "shifted-window" in rows["swin_transformer.SwinTransformer"].detail
