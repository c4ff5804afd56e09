"""ASIC target: gate-equivalent area / power / energy / latency estimate (no synthesis).

Only :func:`estimate` exists (no emit/build): see :mod:`.estimate` for the model and its sources.
"""
from .estimate import estimate

__all__ = ["estimate"]
