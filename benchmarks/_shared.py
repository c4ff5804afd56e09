"""Where the team's ``shared/`` folder is (real models with test vectors, published reference numbers).

Used by the benchmarks and by ``tests/conftest.py``: ``$QDEPLOY_SHARED``, else ``../shared`` next to
this checkout, else ``../shared`` next to the repository this one was cloned from (so a fresh
``git clone /work/main /tmp/x`` still finds ``/work/shared``).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def find_shared() -> Path:
    """The ``shared/`` folder (the first candidate that exists, else ``../shared`` next to the repo)."""
    if os.environ.get("QDEPLOY_SHARED"):
        return Path(os.environ["QDEPLOY_SHARED"])
    cands = [REPO.parent / "shared"]
    try:
        url = subprocess.run(["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        if url and "://" not in url and Path(url).is_dir():
            cands.append(Path(url).resolve().parent / "shared")
    except (OSError, subprocess.SubprocessError):
        pass
    return next((c for c in cands if c.is_dir()), cands[0])


SHARED = find_shared()


if __name__ == "__main__":  # for shell scripts: QDEPLOY_SHARED="$(python benchmarks/_shared.py)"
    print(SHARED)
