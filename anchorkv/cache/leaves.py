"""Which indexed chunks have no indexed child, kept as chunks come and go.

Only leaves may be evicted (a chunk is useless without its parent). Tracking them incrementally keeps an
eviction proportional to the number of leaves, not to the whole index.
"""

from __future__ import annotations

from collections.abc import Container


class Leaves:
    def __init__(self) -> None:
        self.keys: set[bytes] = set()
        self._children: dict[bytes, int] = {}  # parent key -> indexed children

    def add(self, key: bytes, parent: bytes) -> None:
        """key was indexed (once) under parent."""
        if not self._children.get(key):
            self.keys.add(key)
        self._children[parent] = self._children.get(parent, 0) + 1
        self.keys.discard(parent)

    def remove(self, key: bytes, parent: bytes, index: Container[bytes]) -> None:
        """key left the index; its parent becomes a leaf when it is indexed and has no other child."""
        self.keys.discard(key)
        n = self._children.get(parent, 0) - 1
        if n > 0:
            self._children[parent] = n
            return
        self._children.pop(parent, None)
        if parent in index:
            self.keys.add(parent)

    def clear(self) -> None:
        self.keys.clear()
        self._children.clear()
