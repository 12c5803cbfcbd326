"""The top-level folders are layers and imports only point down: a file's folder says who runs it and what
it may touch.

`shared_models` is the contract both sides share; `privacy` builds on it; the site (`client`) and the
consortium (`server`) build on both and never on each other; `simulations` and `benchmarks` drive them;
`tests` sit on top. Every import is checked, at module level and inside functions, `import x` and
`from x import y`, relative ones resolved against the file's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "shared_models", "privacy", "simulations", "benchmarks")

# package -> the top-level packages it must not import
FORBIDDEN = {
    "client": {"server", "simulations", "benchmarks", "tests"},
    "server": {"client", "simulations", "benchmarks", "tests"},
    "shared_models": {"privacy", "client", "server", "simulations", "benchmarks", "tests"},
    "privacy": {"client", "server", "simulations", "benchmarks", "tests"},
    "simulations": {"tests"},
    "benchmarks": {"tests"},
}


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str, str]]:
    """(line, imported module, the import as written) for every import in the file."""
    package = path.relative_to(root).parts[:-1]  # where a relative import starts (also for an __init__.py)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, f"import {alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ", ".join(alias.name for alias in node.names)
            written = f"from {'.' * node.level}{node.module or ''} import {names}"
            if node.level:  # one dot: this file's package; each further dot: one package up
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module, written))
    return out


def test_the_checker_resolves_relative_and_function_level_imports(tmp_path):
    f = tmp_path / "client" / "sub" / "mod.py"
    f.parent.mkdir(parents=True)
    f.write_text("from ..server import x\nfrom . import y\nimport shared_models.files as files\n"
                 "def f():\n    from server.app import main\n")
    assert [(line, m) for line, m, _ in imported_modules(f, root=tmp_path)] == [
        (1, "client.server"), (2, "client.sub"), (3, "shared_models.files"), (5, "server.app")]


def test_imports_point_down_the_layers():
    violations = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module, written in imported_modules(path):
                top = module.split(".")[0]
                if top in FORBIDDEN[package]:
                    violations.append(f"{path.relative_to(ROOT)}:{line}: {written}  ({package} -> {top})")
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_serving_predicting_and_evaluating_never_load_opacus():
    """Opacus' import costs seconds of CPU; a deployed site starts a process per message and the service loads
    the model on start: only DP training (privacy/clipping.py) may pay it."""
    import subprocess
    import sys

    code = ("import sys, shared_models.model, shared_models.evaluation, client.site, client.predict, client.serve; "
            "from client.site import evaluate_global; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'opacus'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
