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


class ModelImportError(QDeployError):
    """The model file or module could not be turned into IR (malformed file, unknown op...)."""


class UnsupportedError(QDeployError):
    """The model is valid but uses something a stage or target does not support."""


class VerifyError(QDeployError):
    """The IR is inconsistent (shapes, types, order, dangling values)."""


class CompileError(QDeployError):
    """A backend failed to emit or build the artifact."""


class FeedError(QDeployError, ValueError):
    """Bad input arrays for a model or an artifact (wrong count or shape, NaN into a fixed-point
    input), raised alike by the reference interpreter and the compiled backends; also a
    ``ValueError``.  A message that already names the input (``input 'x' ...``) is not prefixed
    with ``node 'x':`` again."""

    def one_line(self) -> str:
        if self.node and f"input {self.node!r}" in str(self.reason):
            return " ".join(str(self.reason).split())
        return super().one_line()


class PassError(QDeployError):
    """A compiler pass failed, or left an invalid graph behind.

    Attributes:
        pass_name: the registered name of the pass (e.g. ``"remat"``); :meth:`one_line` starts
            with ``pass <name>:`` so the CLI's error line names it.
        node / reason: as for :class:`QDeployError` (taken from the underlying error when it is one).
        cause: the exception the pass raised (None when the pass returned an invalid graph).
    """

    def __init__(self, reason: str, node: str | None = None, pass_name: str | None = None,
                 cause: BaseException | None = None):
        self.pass_name = pass_name
        self.cause = cause
        super().__init__(reason, node)

    def one_line(self) -> str:
        """``pass <name>: `` followed by :meth:`QDeployError.one_line`."""
        base = super().one_line()
        return f"pass {self.pass_name}: {base}" if self.pass_name else base
