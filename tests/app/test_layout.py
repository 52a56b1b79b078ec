"""How the application is laid out: main_maskedkd.py only starts it, and its modules import each other one way."""
import ast
import subprocess
from pathlib import Path

from tinymodels import ROOT

APP = "maskedkd_app"
ENTRY = "main_maskedkd"


def _python_files():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an unpacked copy): every .py file on disk
        return sorted(p for p in Path(ROOT).rglob("*.py") if ".git" not in p.parts and ".library" not in p.parts)
    return [Path(ROOT) / name for name in out.stdout.split()]


def _imports(path: Path, package: str = ""):
    """Every module ``path`` imports, at any depth (a function-level import is a dependency too)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            if node.level and node.module is None:  # from . import x, y
                yield from (f"{base}.{alias.name}" for alias in node.names)
            else:
                yield module


def test_nothing_imports_the_entry_script():
    files = _python_files()
    offenders = [str(path.relative_to(ROOT)) for path in files
                 if any(name.split(".")[0] == ENTRY for name in _imports(path))]
    assert len(files) > 40 and any(path.name == "test_main.py" for path in files)  # the scan saw the repository
    assert not offenders, f"import {ENTRY} (import the application from {APP}/ instead): {offenders}"


def test_entry_script_only_starts_the_cli():
    tree = ast.parse((Path(ROOT) / f"{ENTRY}.py").read_text())
    functions = [node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert not functions, f"{ENTRY}.py defines {functions}: application code belongs in {APP}/"
    assert f"{APP}.cli" in set(_imports(Path(ROOT) / f"{ENTRY}.py"))


def test_app_modules_import_each_other_without_a_cycle():
    # The entry script is a node too: the old cycle ran through it (demo -> shipped_teacher -> main_maskedkd).
    modules = {f"{APP}.{path.stem}": path for path in sorted((Path(ROOT) / APP).glob("*.py"))}
    modules[ENTRY] = Path(ROOT) / f"{ENTRY}.py"
    graph = {name: {dep for dep in _imports(path, APP if name != ENTRY else "") if dep in modules and dep != name}
             for name, path in modules.items()}
    assert {f"{APP}.train", f"{APP}.demo"} <= set(graph) and graph[f"{APP}.cli"]  # the graph is the real one
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(trail + [name])}"
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        state[name] = "done"

    for name in graph:
        visit(name, [])
