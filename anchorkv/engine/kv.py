"""One stage's KV: plain tensors that can be sliced, saved and restored at any token position."""

from __future__ import annotations

import torch

from anchorkv.cache.chunk import KVSlice

PREFAULT_BYTES = 1 << 20  # a prefault step's share: a request that arrives meanwhile waits about 0.3-3 ms


class StageKV:
    """k, v: [n_layers, Hkv, ctx, hd]. Positions at or past `filled` hold no valid KV."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        ctx: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        # never read past `filled`; untouched pages of an empty tensor take no memory until written
        self.k = torch.empty(n_layers, n_kv_heads, ctx, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.filled = 0
        self.high = 0  # the furthest position ever written: pages up to it are resident
        self.resident = 0  # layers [0, resident) are resident whole (see prefault)
        self._prefaulted = 0  # and layer `resident` up to this position

    @property
    def ctx(self) -> int:
        return self.k.shape[2]

    def export(self, start: int, end: int) -> KVSlice:
        if not 0 <= start <= end <= self.filled:
            raise IndexError(f"cannot export [{start}, {end}): only [0, {self.filled}) is filled")
        return KVSlice(start, self.k[:, :, start:end].clone(), self.v[:, :, start:end].clone())

    def restore(self, piece: KVSlice) -> None:
        """Write piece into place. Pieces must be restored in order from position 0."""
        if piece.start > self.filled:
            raise IndexError(f"restore at {piece.start} would leave a gap after {self.filled}")
        self.k[:, :, piece.start : piece.end] = piece.k
        self.v[:, :, piece.start : piece.end] = piece.v
        self.filled = piece.end
        self.high = max(self.high, self.filled)

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def position_bytes(self) -> int:
        """K and V of one position in one layer."""
        return 2 * self.k[0, :, 0].nbytes

    def prefault(self) -> bool:
        """Make about PREFAULT_BYTES more of the pool resident, so that no later write waits on the kernel
        for fresh memory; only positions past `high` are written, which hold nothing. Returns whether any
        of the pool is left."""
        if self.resident < self.n_layers:
            start = max(self.high, self._prefaulted)
            end = min(self.ctx, start + max(1, PREFAULT_BYTES // self.position_bytes))
            self.k[self.resident, :, start:end].zero_()
            self.v[self.resident, :, start:end].zero_()
            self._prefaulted = end
            if end == self.ctx:
                self.resident, self._prefaulted = self.resident + 1, 0
        return self.resident < self.n_layers

    @property
    def touched_bytes(self) -> int:
        """Bytes of the KV written or made resident so far (untouched pages of the pool take no memory)."""
        rows = self.resident * self.ctx + (self.n_layers - self.resident) * self.high
        return self.position_bytes * (rows + max(0, self._prefaulted - self.high))

    def truncate(self, n: int) -> None:
        self.filled = min(self.filled, n)
