"""Package discovery for the setuptools build (everything else is in pyproject.toml).

The distribution ``qdeploy`` is assembled from the top-level folders named in pyproject's
``[tool.setuptools] package-dir`` (``qdeploy.compiler`` is ``compiler/``, ...).  setuptools'
``packages.find`` cannot prefix the packages it finds under such a folder, so the package list is
generated here: every folder with an ``__init__.py`` under a mapped folder, named after its
mapping.  A new subpackage is shipped without editing any list.
"""
import tomllib
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def discover_packages() -> list[str]:
    """Every package of the distribution: the mapped ones and all their subpackages."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = []
    for pkg, folder in mapping.items():
        base = ROOT / folder
        for init in sorted(base.rglob("__init__.py")):
            rel = init.parent.relative_to(base).parts
            if all((base.joinpath(*rel[:i]) / "__init__.py").is_file() for i in range(len(rel))):
                found.append(".".join((pkg, *rel)))
    return sorted(found)


setup(packages=discover_packages())
