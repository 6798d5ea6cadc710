"""What the C kernels' wrappers share: each computes its part of the forward in the kernel where the kernel
fits the model, else with torch's ops."""

from __future__ import annotations

import ctypes


class KernelOp:
    def __init__(self, kernel: ctypes.CDLL | None, fits: bool) -> None:
        self._kernel = kernel if fits else None

    @property
    def kernel(self) -> ctypes.CDLL:
        """The kernel, where one fits: call only where `kind` is not "torch"."""
        assert self._kernel is not None
        return self._kernel

    @property
    def kind(self) -> str:
        return "kernel" if self._kernel is not None else "torch"
