"""Brief training of corpus models (seconds each), cached by content hash.

The cache lives in ``$QDEPLOY_CORPUS_CACHE`` or ``<tempdir>/qdeploy-corpus``; a key hashes the
entry name, its settings, the source text of the corpus modules that define models and data,
the training function, and the torch/brevitas/onnxruntime versions, so any change retrains.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
_SOURCES = ("brevitas_models.py", "ort_models.py", "data.py")


def cache_dir() -> Path:
    """The cache folder (created)."""
    d = Path(os.environ.get("QDEPLOY_CORPUS_CACHE") or Path(tempfile.gettempdir()) / "qdeploy-corpus")
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_key(*parts) -> str:
    """A hex digest of ``parts`` (reprs), the model and data sources of the corpus, the source of
    :func:`fit` and the library versions."""
    import inspect

    import brevitas
    import onnxruntime
    import torch
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    for f in _SOURCES:
        h.update((_HERE / f).read_bytes())
    h.update(inspect.getsource(fit).encode())
    h.update(f"{torch.__version__}|{brevitas.__version__}|{onnxruntime.__version__}".encode())
    return h.hexdigest()[:24]


def atomic_save(obj_writer, path: Path):
    """Write ``path`` through ``obj_writer(tmp_path)`` and an atomic rename (parallel runs share the cache)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    obj_writer(tmp)
    os.replace(tmp, path)


def fit(model, x: np.ndarray, y: np.ndarray, steps: int = 80, seed: int = 0, lr: float = 1e-2):
    """Train ``model`` in place with Adam on cross-entropy for ``steps`` mini-batches of 64.

    A model returning a tuple (two heads) is trained on class (head 0) and parity ``y % 2``
    (head 1).  Returns the model in eval mode.
    """
    import torch
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ce = torch.nn.functional.cross_entropy
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(X), (64,), generator=gen)
        out = model(X[i])
        loss = ce(out[0], Y[i]) + ce(out[1], Y[i] % 2) if isinstance(out, tuple) else ce(out, Y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def trained(name: str, make, x: np.ndarray, y: np.ndarray, steps: int = 80):
    """``make()`` trained by :func:`fit`, its weights cached under ``name`` and the content hash."""
    import torch
    path = cache_dir() / f"{name}-{cache_key(name, steps)}.pt"
    model = make()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    fit(model, x, y, steps)
    atomic_save(lambda p: torch.save(model.state_dict(), p), path)
    return model


def accuracy(outputs, y: np.ndarray) -> float:
    """Top-1 accuracy of (the first head of) ``outputs`` against labels ``y``."""
    o = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    return float(np.mean(np.asarray(o).argmax(1) == y))
