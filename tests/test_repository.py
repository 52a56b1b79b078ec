"""Repository-wide rules that no single module's tests see: line length, no sys.path patches in the tests."""
import re
import subprocess
from pathlib import Path

from tinymodels import ROOT


def _tracked(pattern: str):
    out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an unpacked copy): every file of that kind on disk
        return sorted(p for p in Path(ROOT).rglob(pattern) if ".git" not in p.parts)
    return [Path(ROOT) / name for name in out.stdout.split()]


def test_python_lines_meet_the_configured_length():
    # Read with a pattern, not tomllib: the tests run on Python 3.9 too, which has no tomllib.
    limit = int(re.search(r"^line-length\s*=\s*(\d+)", (Path(ROOT) / "pyproject.toml").read_text(), re.M).group(1))
    long_lines = [f"{path.relative_to(ROOT)}:{number} ({len(line)} chars)"
                  for path in _tracked("*.py")
                  for number, line in enumerate(path.read_text().splitlines(), 1) if len(line) > limit]
    assert not long_lines, f"lines over {limit} characters (pyproject.toml [tool.ruff]): {long_lines}"


def test_tests_take_their_path_from_pyproject():
    patched = [str(path.relative_to(ROOT)) for path in _tracked("tests/*.py")
               if re.search(r"sys\.path(\.insert|\.append|\[)", path.read_text()) and path.name != Path(__file__).name]
    assert not patched, f"tests that patch sys.path (pyproject's pythonpath, or PYTHONPATH in a subprocess): {patched}"
