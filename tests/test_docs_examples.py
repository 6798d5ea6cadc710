"""Every example marked runnable in the README and docs/ (a fence such as ```python run) runs against a
live server, as a reader would paste it."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from anchorkv.config import ServerConfig
from conftest import LiveServer, cached_server

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = re.compile(r"^```(python|sh) run\n(.*?)^```", re.S | re.M)
EXAMPLES = [
    pytest.param(lang, code, id=f"{path.name}:{text[: m.start()].count(chr(10)) + 1}")
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for text in [path.read_text()]
    for m in RUNNABLE.finditer(text)
    for lang, code in [m.groups()]
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from cached_server(tmp_path_factory, ServerConfig())


def test_the_docs_have_runnable_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("lang, code", EXAMPLES)
def test_an_example_runs(server: LiveServer, lang: str, code: str) -> None:
    host = server.url.removeprefix("http://")
    code = code.replace("127.0.0.1:8080", host).replace("localhost:8080", host)
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # examples bound their replies
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()  # each example prints what it got
