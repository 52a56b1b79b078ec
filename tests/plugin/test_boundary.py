"""The plugin (``losses.py`` + ``deit_patch/``) must never reach into the training application."""
import ast
import subprocess
import sys
from pathlib import Path

from tinymodels import ROOT

APP_PACKAGE = "maskedkd_app"


def _plugin_files():
    root = Path(ROOT)
    return [root / "losses.py"] + sorted((root / "deit_patch").rglob("*.py"))


def _imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_no_plugin_file_imports_the_app():
    offenders = [f"{path.relative_to(ROOT)} imports {name}" for path in _plugin_files()
                 for name in _imported_modules(path) if name.split(".")[0] == APP_PACKAGE]
    assert len(_plugin_files()) > 5  # the scan really looked at the plugin
    assert not offenders, offenders


def test_importing_the_loss_loads_no_app_module():
    code = ("import sys, losses, deit_patch.capture, deit_patch.masking, deit_patch.teachers, deit_patch.cost, "
            "deit_patch.teacher_input; print(sorted(m for m in sys.modules if m.split('.')[0] == 'maskedkd_app'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
