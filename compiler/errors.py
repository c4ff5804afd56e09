"""Errors qdeploy raises for bad input.  Every message names the model node at fault."""
from __future__ import annotations


class QDeployError(Exception):
    """Base class: a user-facing, one-line error.

    Attributes:
        node: name of the model node at fault (or None when the whole model is at fault).
        reason: what is wrong, in words a user can act on.
    """

    def __init__(self, reason: str, node: str | None = None):
        self.node = node
        self.reason = reason
        super().__init__(self.one_line())

    def one_line(self) -> str:
        msg = f"node '{self.node}': {self.reason}" if self.node else self.reason
        return " ".join(str(msg).split())


class ImportError_(QDeployError):
    """The model file or module could not be turned into IR (malformed file, unknown op...)."""


class UnsupportedError(QDeployError):
    """The model is valid but uses something a stage or target does not support."""


class VerifyError(QDeployError):
    """The IR is inconsistent (shapes, types, order, dangling values)."""


class CompileError(QDeployError):
    """A backend failed to emit or build the artifact."""


class ReferenceError_(QDeployError):
    """Bad feed for the reference interpreter (wrong shape, NaN into a fixed-point input)."""
