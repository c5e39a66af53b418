"""The package's folders import one way (docs/ARCHITECTURE.md): every ``relabel_dali`` import in the
package, the pipelines and the entry points is parsed (function-level imports too) and checked
against the allowed arrows."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "relabel_dali"
SHARED = {"config", "progress", "atomic"}
# Which concern may import which (besides itself and the shared root modules).
ALLOWED = {
    "shared": set(),
    "store": set(),
    "ops": {"store"},
    "data": {"store", "ops"},
    "train": {"store", "ops", "data"},
    "annotate": {"store", "ops", "data"},
}
# pipelines/ takes the data settings and constants, and loads the operators.
PIPELINE_ALLOWED = {"relabel_dali.data.settings", "relabel_dali.data.augment", "relabel_dali.ops.build"}


def concern(module: str) -> str:
    """``relabel_dali.data.listing`` -> ``data``; root modules -> ``shared``."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in SHARED:
        return "shared"
    return parts[1]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a relabel_dali module in ``path``; a ``from X import
    y`` names ``X.y`` when that is a module of the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "relabel_dali"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert PACKAGE not in path.parents, f"{path}:{node.lineno}: the package imports absolutely"
                continue  # within pipelines/
            if node.module and node.module.split(".")[0] == "relabel_dali":
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    is_module = (ROOT / (candidate.replace(".", "/") + ".py")).exists() or \
                        (ROOT / candidate.replace(".", "/")).is_dir()
                    found.append((node.lineno, candidate if is_module else node.module))
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


PACKAGE_FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_folder_has_a_concern():
    folders = {p.parent.relative_to(PACKAGE).parts[0] for p in PACKAGE_FILES if p.parent != PACKAGE}
    assert folders == set(ALLOWED) - {"shared"}
    roots = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert roots == SHARED


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_package_imports_run_one_way(path):
    if path == PACKAGE / "__init__.py":
        return  # the lazy public names point everywhere by design
    own = concern(module_name(path))
    wrong = [f"line {line}: {module}" for line, module in imported_modules(path)
             if concern(module) not in ALLOWED[own] | {own, "shared"}]
    assert not wrong, f"{path.relative_to(ROOT)} ({own}) imports against the arrows: {wrong}"


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.py")), ids=lambda p: p.name)
def test_pipelines_take_only_data_settings_and_constants(path):
    wrong = [f"line {line}: {m}" for line, m in imported_modules(path) if m not in PIPELINE_ALLOWED]
    assert not wrong


def test_checker_sees_a_wrong_arrow(tmp_path):
    """The check itself: a store module that imports the trainer is caught."""
    source = "def f():\n    from relabel_dali.train.engine import train_one_epoch\n"
    fake = tmp_path / "relabel_dali" / "store" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    modules = [m for _, m in imported_modules(fake)]
    assert modules == ["relabel_dali.train.engine"]
    assert concern(modules[0]) not in ALLOWED["store"] | {"store", "shared"}


def test_public_names_resolve_from_the_root():
    import relabel_dali

    for name in relabel_dali.__all__:
        assert getattr(relabel_dali, name).__name__ == name
