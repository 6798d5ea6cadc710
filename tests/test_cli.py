"""The command line refuses bad values with exit status 2 and a message naming the flag."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args, flag",
    [
        (["serve", "--dtype", "float16"], "--dtype"),
        (["serve", "--stages", "0"], "--stages"),
        (["serve", "--threads", "0"], "--threads"),
        (["serve", "--chunk-size", "3"], "--chunk-size"),
        (["serve", "--port", "70000"], "--port"),
        (["bench", "engine", "--device", "tpu"], "--device"),
    ],
)
def test_bad_flag_exits_2_naming_it(args: list[str], flag: str) -> None:
    r = subprocess.run([sys.executable, "-m", "anchorkv", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and flag in r.stderr


def test_help_lists_every_serve_flag() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "anchorkv", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    for flag in [
        "--model",
        "--dtype",
        "--threads",
        "--device",
        "--ctx",
        "--stages",
        "--chunk-size",
        "--api-key",
        "--max-queue",
    ]:
        assert flag in r.stdout


@pytest.mark.parametrize("value", ["sometimes", "auto:0", "-3"])
def test_bad_disk_prefix_cache_exits_2_listing_the_forms(value: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "anchorkv", "serve", "--disk-prefix-cache", value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--disk-prefix-cache" in r.stderr and "auto:N" in r.stderr
