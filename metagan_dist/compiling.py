"""`meta.compile`: a function run through torch.compile, or eagerly once compiling has failed.

torch.compile can fail late: while tracing, while generating code (no working C++ compiler on a
CPU machine, no Triton on a GPU one), or only at the first backward, which is compiled lazily.
So callers run the compiled function inside `try`, report a failure with `failed`, and redo the
work eagerly; the first failure is logged as one warning line and compiling is not tried again in
this process. A run is never stopped by the compiler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


class Compiled:
    """`fn` compiled on first use (torch.compile, static shapes), or None after a failure."""

    def __init__(self, fn: Callable, what: str):
        self.fn, self.what = fn, what
        self._compiled: Callable | None = None
        self.broken = False

    def get(self) -> Callable | None:
        """The compiled function, or None once compiling has failed (run `fn` eagerly then)."""
        if self.broken:
            return None
        if self._compiled is None:
            try:
                self._compiled = torch.compile(self.fn, dynamic=False)
            except Exception as err:  # noqa: BLE001  e.g. a Python version torch.compile does not support
                self.failed(err)
                return None
        return self._compiled

    def failed(self, err: BaseException) -> None:
        """Give up compiling, with one warning line naming the error."""
        if not self.broken:
            root = err
            while (cause := root.__cause__ or getattr(root, "inner_exception", None)) is not None:
                root = cause  # the compiler's wrappers say little; their cause says what failed
            first_line = next((line.strip() for line in str(root).splitlines() if line.strip()), "")[:200]
            logger.warning("meta.compile: torch.compile of %s failed (%s: %s); running it eagerly from now on",
                           self.what, type(root).__name__, first_line)
        self.broken = True
