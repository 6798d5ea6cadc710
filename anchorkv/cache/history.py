"""Recent prompts per namespace, for the auto scope. Kept on disk so auto survives a restart."""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

MAX_WINDOW = 64
MAX_TOKENS = 8192  # a stored prompt is cut here; auto only needs its beginning


class History:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._prompts: dict[str, deque[list[int]]] = {}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                self._prompts = {ns: deque(ps, maxlen=MAX_WINDOW) for ns, ps in data.items()}
            except (ValueError, AttributeError):
                self._prompts = {}

    def namespaces(self) -> list[str]:
        return list(self._prompts)

    def recent(self, namespace: str) -> list[list[int]]:
        return list(self._prompts.get(namespace, ()))

    def add(self, namespace: str, prompt: list[int]) -> None:
        self._prompts.setdefault(namespace, deque(maxlen=MAX_WINDOW)).append(prompt[:MAX_TOKENS])

    def snapshot(self) -> str:
        return json.dumps({ns: list(ps) for ns, ps in self._prompts.items()})

    def save(self, snapshot: str) -> None:
        """Write atomically (called on the disk writer thread)."""
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(snapshot)
        os.replace(tmp, self.path)
