import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# reproducible property tests: the same examples on every run (CI and local)
settings.register_profile("qdeploy", derandomize=True)
settings.load_profile("qdeploy")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QDEPLOY_SHARED", REPO.parent / "shared"))
REALCASES = SHARED / "realcases"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
