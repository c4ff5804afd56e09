"""Architecture rules of ../shared/DESIGN.md, checked on the source with ``ast``.

Every module of the package is parsed (folders mapped to packages by pyproject's
``package-dir``); ALL imports count, function-local ones included, relative imports resolved.
Checked: no module imports another module's ``_private`` names, the module import graph has no
cycle, ``import qdeploy`` loads no torch / tvm / hls4ml, and the layer rules that hold today
(``compiler/ir`` imports no torch/hls4ml/tvm; ``runtime`` imports neither ``compiler.frontends``
nor ``passes``; ``passes`` imports neither the user layer -- ``api``, ``report``, ``cli`` -- nor
``runtime`` nor ``backends``).
"""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "qdeploy"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """``{package: folder}`` from pyproject's ``[tool.setuptools] package-dir``."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    return {pkg: root / d for pkg, d in cfg["tool"]["setuptools"]["package-dir"].items()}


def discover_modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is_package)}`` for every ``.py`` file of the package."""
    dirs = package_dirs(root)
    mods: dict[str, tuple[Path, bool]] = {}
    for pkg, folder in dirs.items():
        for p in sorted(folder.rglob("*.py")):
            rel = p.relative_to(folder).with_suffix("").parts
            sub = pkg + "".join(f".{x}" for x in rel)
            is_pkg = rel[-1] == "__init__"
            name = sub[: -len(".__init__")] if is_pkg else sub
            mods[name] = (p, is_pkg)
    return mods


def module_imports(source: str, name: str, is_pkg: bool, known) -> list[tuple[str, str | None, int]]:
    """Every import of ``source`` (module ``name``), function-local ones included, as
    ``(imported module, imported name or None, line)`` with relative imports resolved.  ``from M
    import x`` gives ``(M.x, None)`` when ``M.x`` is a module in ``known``, else ``(M, x)``; a
    private attribute read on a name bound to an imported qdeploy module (``from . import api``
    then ``api._f``) gives ``(module, "_f")``."""
    tree = ast.parse(source)
    package = name if is_pkg else name.rpartition(".")[0]
    out: list[tuple[str, str | None, int]] = []
    bound: dict[str, str] = {}  # local name -> qdeploy module it refers to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, None, node.lineno))
                if a.asname:
                    bound[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                full = f"{mod}.{a.name}"
                if full in known:
                    out.append((full, None, node.lineno))
                    bound[a.asname or a.name] = full
                else:
                    out.append((mod, a.name, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and is_private(node.attr)):
            out.append((bound[node.value.id], node.attr, node.lineno))
    return out


def is_private(name: str) -> bool:
    """A ``_private`` name: one leading underscore (dunders like ``__version__`` are public)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_table(root: Path = ROOT) -> dict[str, list[tuple[str, str | None, int]]]:
    """``{module: its imports}`` (see :func:`module_imports`) for the whole package."""
    mods = discover_modules(root)
    return {m: module_imports(p.read_text(), m, is_pkg, mods) for m, (p, is_pkg) in mods.items()}


def private_imports(table: dict, known) -> list[str]:
    """``"module:line imports other._name"`` for every private name taken from another module."""
    bad = []
    for mod, imps in table.items():
        for target, nm, line in imps:
            if nm is not None and is_private(nm) and target != mod and target.split(".")[0] == PKG:
                bad.append(f"{mod}:{line} imports {target}.{nm}")
    return bad


def import_graph(table: dict, known) -> nx.DiGraph:
    """Directed graph module -> imported module (package modules only, self-imports dropped)."""
    g = nx.DiGraph()
    g.add_nodes_from(known)
    for mod, imps in table.items():
        for target, _nm, _line in imps:
            if target in known and target != mod:
                g.add_edge(mod, target)
    return g


def find_cycle(g: nx.DiGraph) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    try:
        edges = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return None
    return [a for a, _b in edges] + [edges[0][0]]


@pytest.fixture(scope="module")
def table():
    return import_table()


@pytest.fixture(scope="module")
def known():
    return set(discover_modules())


def test_module_discovery_covers_every_folder(known):
    # one module from each mapped folder, including nested packages
    for m in ("qdeploy.api", "qdeploy.compiler.ir.graph", "qdeploy.passes.fold", "qdeploy.backends.asic",
              "qdeploy.runtime.artifact", "qdeploy.runtime.dynamic.plan"):
        assert m in known, m
    assert len(known) > 50


def test_no_private_name_imported_from_another_module(table, known):
    bad = private_imports(table, known)
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_private_import_detector_finds_violations():
    known = {"qdeploy", "qdeploy.api", "qdeploy.runtime", "qdeploy.runtime.x"}
    src = ("from ..api import _staging_dir, load\nfrom .. import api\n\ndef f():\n    return api._publish\n"
           "from ..version import __version__\n")
    imps = module_imports(src, "qdeploy.runtime.x", False, known | {"qdeploy.version"})
    bad = private_imports({"qdeploy.runtime.x": imps}, known)
    assert bad == ["qdeploy.runtime.x:1 imports qdeploy.api._staging_dir",
                   "qdeploy.runtime.x:5 imports qdeploy.api._publish"]


def test_import_graph_has_no_cycle(table, known):
    cyc = find_cycle(import_graph(table, known))
    assert cyc is None, "import cycle (function-local imports count): " + " -> ".join(cyc)


def test_cycle_detector_finds_a_cycle():
    known = {"qdeploy.a", "qdeploy.b", "qdeploy.c"}
    table = {"qdeploy.a": module_imports("import qdeploy.b\n", "qdeploy.a", False, known),
             "qdeploy.b": module_imports("def f():\n    from .c import g\n", "qdeploy.b", False, known),
             "qdeploy.c": module_imports("from . import a\n", "qdeploy.c", False, known)}
    cyc = find_cycle(import_graph(table, known))
    assert cyc is not None and cyc[0] == cyc[-1] and set(cyc) == known
    table["qdeploy.c"] = []
    assert find_cycle(import_graph(table, known)) is None


def test_import_qdeploy_loads_no_heavy_library():
    code = ("import sys, qdeploy\n"
            "print(','.join(sorted(m for m in ('torch', 'tvm', 'hls4ml') if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"import qdeploy loaded {r.stdout.strip()}"


def _imports_under(table, prefix):
    return [(m, t, line) for m, imps in table.items() if m == prefix or m.startswith(prefix + ".")
            for t, _nm, line in imps]


def test_ir_imports_no_torch_hls4ml_tvm(table):
    bad = [f"{m}:{line} imports {t}" for m, t, line in _imports_under(table, "qdeploy.compiler.ir")
           if t.split(".")[0] in ("torch", "hls4ml", "tvm")]
    assert not bad, "\n".join(bad)


def test_runtime_imports_no_frontend_or_pass(table):
    bad = [f"{m}:{line} imports {t}" for m, t, line in _imports_under(table, "qdeploy.runtime")
           if t.startswith(("qdeploy.compiler.frontends", "qdeploy.passes"))]
    assert not bad, "\n".join(bad)


def test_passes_import_no_user_layer_runtime_or_backend(table):
    """DESIGN.md: ``passes/`` holds Graph -> Graph passes and the analyses they call; backend costs
    reach them through ``PassContext.cost_models``, never by import."""
    banned = ("qdeploy.api", "qdeploy.report", "qdeploy.cli", "qdeploy.runtime", "qdeploy.backends")
    bad = [f"{m}:{line} imports {t}" for m, t, line in _imports_under(table, "qdeploy.passes")
           if t in banned or t.startswith(tuple(b + "." for b in banned))]
    assert not bad, "\n".join(bad)


def test_reference_interpreter_imports_no_pass_or_backend(table):
    """The golden model depends only on the IR (DESIGN.md: compiler/reference.py)."""
    bad = [f"{m}:{line} imports {t}" for m, t, line in _imports_under(table, "qdeploy.compiler.reference")
           if t.startswith(("qdeploy.passes", "qdeploy.backends", "qdeploy.runtime", "qdeploy.api"))]
    assert not bad, "\n".join(bad)
