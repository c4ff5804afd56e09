"""Artifact directories: staging, publishing, the replace policy, manifests and digests.

Every output qdeploy writes -- a compiled artifact (:func:`qdeploy.compile`), a search output
(:func:`qdeploy.search`), an early-exit program and a dynamic program -- goes through this module:

1. :func:`check_out_dir` turns the user's path into an absolute one and refuses names that can
   never be an output directory;
2. :func:`check_replaceable` decides whether an existing directory may be replaced (only an
   earlier output of the same kind or an empty directory; never the working directory, one of
   its parents, or a directory holding the source model);
3. the output is written into :func:`staging_dir` (a hidden temporary sibling, so the final step
   is a rename on the same filesystem) and moved into place by :func:`publish` only when it is
   complete: a failed run leaves no half-written output (the caller removes the staging folder);
4. :func:`write_manifest` / :func:`read_manifest` handle ``manifest.json`` (target, library
   :func:`versions`, config, file digests from :func:`file_hashes`, exactness result).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..compiler.errors import QDeployError
from ..version import __version__

__all__ = ["ArtifactError", "MANIFEST", "check_out_dir", "staging_dir", "publish", "check_replaceable",
           "is_artifact", "write_manifest", "read_manifest", "file_hashes", "versions"]

#: File name of an artifact's manifest.
MANIFEST = "manifest.json"

#: Libraries whose versions a manifest records (when installed), besides qdeploy itself.
VERSIONED_PACKAGES = ("numpy", "onnx", "qonnx", "hls4ml", "apache-tvm", "torch", "brevitas")


class ArtifactError(QDeployError):
    """The directory is not a complete qdeploy artifact (no or bad ``manifest.json``)."""


def check_out_dir(out_dir) -> Path:
    """``out_dir`` as an absolute path, checked that it can become an output directory.

    Raises:
        QDeployError: empty name, an existing file (not a directory: ``force`` replaces only an
            artifact directory), a path under a regular file, or a nearest existing parent that is
            not writable.
    """
    if out_dir is None or str(out_dir).strip() == "":
        raise QDeployError("output directory name is empty")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise QDeployError(f"output path {out} is a file, not a directory (--force / force=True replaces only an "
                           "earlier output directory): choose another path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QDeployError(f"cannot create output directory {out}: {parent} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise QDeployError(f"cannot create output directory {out}: {parent} is not writable")
            break
    return out


def staging_dir(out_dir: Path) -> Path:
    """A fresh temporary sibling ``.<name>.tmp-*`` of ``out_dir`` (same filesystem, so
    :func:`publish` is a rename); missing parents of ``out_dir`` are created.

    The output is written there and only moved into place when complete; the caller removes the
    staging directory on failure.

    Raises:
        QDeployError: the parent cannot be created or written.
    """
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise QDeployError(f"cannot create output directory {out_dir}: {e.strerror or e}") from None


def publish(tmp: Path, out_dir: Path) -> None:
    """Make the finished staging directory ``tmp`` the output ``out_dir``: mode 0755, an existing
    ``out_dir`` (which the caller has checked with :func:`check_replaceable`) removed, then an
    atomic rename."""
    os.chmod(tmp, 0o755)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def check_replaceable(out_dir: Path, model, is_ours=None,
                      kind: str = "a qdeploy artifact (no qdeploy manifest.json)") -> None:
    """Check that the existing ``out_dir`` may be replaced (``--force``).

    Only an earlier output (``is_ours(out_dir)`` true; default :func:`is_artifact`) or an empty
    directory is ever replaced -- never the working directory, one of its parents, or a directory
    holding the source ``model`` (a path or ``file:function`` spec; other models are not checked).

    Args:
        out_dir: absolute path (:func:`check_out_dir`) of an existing entry.
        model: the source model, as given by the user.
        is_ours: predicate recognising an earlier output of this kind.
        kind: what such an output is, for the message.
    Raises:
        QDeployError: when ``out_dir`` is not safe to replace.
    """
    cwd = Path.cwd().resolve()
    if not out_dir.is_dir():
        raise QDeployError(f"output path {out_dir} exists and is not a directory")
    if out_dir == cwd or out_dir in cwd.parents:
        raise QDeployError(f"refusing to replace {out_dir}: it is the working directory or one of its parents")
    if isinstance(model, (str, os.PathLike)):
        src = Path(str(model).split(":")[0]).resolve()
        if src == out_dir or out_dir in src.parents:
            raise QDeployError(f"refusing to replace {out_dir}: it holds the source model {src}")
    if any(out_dir.iterdir()) and not (is_ours or is_artifact)(out_dir):
        raise QDeployError(f"refusing to replace {out_dir}: it is not {kind} and not empty")


def is_artifact(d: Path) -> bool:
    """Whether ``d`` is a directory written by :func:`qdeploy.compile`: its ``manifest.json`` has
    qdeploy's keys (format, target, versions with qdeploy's, graph digest) and an ``ir`` folder."""
    try:
        m = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(m, dict) and {"format", "target", "versions", "graph_digest"} <= set(m)
            and isinstance(m.get("versions"), dict) and "qdeploy" in m["versions"] and (d / "ir").is_dir())


def write_manifest(directory: Path, manifest: dict) -> Path:
    """Write ``manifest`` as ``directory/manifest.json`` (indented JSON, non-JSON values as
    ``str``); returns the path."""
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, default=str))
    return path


def read_manifest(directory) -> dict:
    """The parsed ``directory/manifest.json``.

    Raises:
        ArtifactError: no manifest, or one that cannot be read or parsed.
    """
    directory = Path(directory)
    mf = directory / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{directory} is not a qdeploy artifact: no {MANIFEST}")
    try:
        return json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{directory}: unreadable artifact ({type(e).__name__}: {e})") from None


def file_hashes(root: Path, limit: int = 400) -> dict:
    """``{relative path: first 16 hex digits of its SHA-256}`` for the files under ``root``
    (sorted, at most ``limit``, the manifest itself excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and len(out) < limit and p.name != MANIFEST:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


def versions() -> dict:
    """``{package: version}`` of qdeploy and of the installed :data:`VERSIONED_PACKAGES`."""
    import importlib.metadata as md
    out = {"qdeploy": __version__}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
