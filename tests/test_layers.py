"""The import layers: nanochat <- registry <- streamlit_app / tools, and torch stays out of start-up."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)) and top_level_only:
            found |= imports_of_nodes(node)
    return found


def imports_of_nodes(node) -> set[str]:
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            found.add(n.module.split(".")[0])
    return found


def py_files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_nanochat_never_imports_registry_or_streamlit():
    for f in py_files("nanochat"):
        assert not imports_of(f, top_level_only=False) & {"registry", "streamlit", "streamlit_app"}, f


def test_registry_never_imports_streamlit_and_torch_only_lazily():
    for f in py_files("registry"):
        assert not imports_of(f, top_level_only=False) & {"streamlit", "streamlit_app"}, f
        assert "torch" not in imports_of(f, top_level_only=True), f"{f} imports torch at module level"


def test_app_pages_touch_neither_sql_nor_torch():
    for f in py_files("streamlit_app"):
        assert not imports_of(f, top_level_only=False) & {"sqlalchemy", "torch"}, f


@pytest.mark.parametrize("modules", [
    ["nanochat", "nanochat.checkpoint_manager", "nanochat.tokenizer", "nanochat.torchfile", "nanochat.common",
     "nanochat.model_config", "nanochat.schedule", "nanochat.sampling", "nanochat.quick_check",
     "nanochat.train_config", "nanochat.atomic_file"],
    ["registry", "registry.cli", "registry.store", "registry.scanner", "registry.history", "registry.logimport",
     "registry.inspection", "registry.integrity"],
])
def test_modules_import_without_torch(modules):
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
        "heavy = [m for m in ('torch', 'streamlit') if m in sys.modules]\nassert not heavy, heavy\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("module", ["streamlit_app.app", "streamlit_app.data", "streamlit_app.traces"])
def test_app_entry_and_data_module_import_without_torch(module):
    """The app starts without torch: only the Generate and Compare pages load models (through data.py)."""
    code = (f"import importlib, sys\nimportlib.import_module({module!r})\n"
            "assert 'torch' not in sys.modules, 'torch imported at start-up'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
