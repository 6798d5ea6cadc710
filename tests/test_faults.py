"""Faults in the cache folder, on real files: the engine always starts, and a bad file is a miss."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from anchorkv.cache.disk_tier import SUFFIX
from anchorkv.cache.prefix_cache import CacheConfig, CacheRequest
from anchorkv.config import EngineConfig
from anchorkv.engine.engine import Engine, Finished
from anchorkv.engine.sampling import SamplingParams
from anchorkv.engine.stage import prefill_row_floor
from anchorkv.model.transformer import Linear


def make(folder: Path) -> Engine:
    return Engine(EngineConfig(threads=2, parallel=1), CacheConfig(ram_mb=64, cache_dir=folder, scope="full"))


def serve_one(e: Engine) -> Finished:
    r = e.render_chat([{"role": "user", "content": "Name a color."}])
    params = SamplingParams(max_tokens=4, temperature=0)
    done = list(e.generate(r.token_ids, params, cache_req=CacheRequest(r.boundaries)))[-1]
    assert isinstance(done, Finished)
    return done


def namespace_dir(folder: Path) -> Path:
    make(folder).cache.flush()
    (ns,) = [p for p in folder.iterdir() if p.is_dir()]
    return ns


def test_a_file_where_the_cache_folder_belongs_turns_the_disk_tier_off(tmp_path: Path) -> None:
    folder = tmp_path / "kv"
    folder.write_text("not a folder")
    e = make(folder)
    assert not e.cache.has_disk
    assert "FileExistsError" in str(e.cache.stats().disk_error)
    assert serve_one(e).completion_tokens == 4


def test_a_file_where_a_namespace_folder_belongs_turns_the_disk_tier_off(tmp_path: Path) -> None:
    ns = namespace_dir(tmp_path)
    for p in ns.iterdir():
        p.unlink()
    ns.rmdir()
    ns.write_text("x")
    e = make(tmp_path)
    assert e.cache.stats().disk_error is not None
    assert serve_one(e).completion_tokens == 4


def test_a_folder_named_like_a_chunk_file_is_left_alone(tmp_path: Path) -> None:
    ns = namespace_dir(tmp_path)
    odd = ns / ("0" * 32 + SUFFIX)
    odd.mkdir()
    e = make(tmp_path)
    assert e.cache.has_disk
    assert e.cache.stats().disk_error is None
    assert serve_one(e).completion_tokens == 4
    assert odd.is_dir()


def test_namespace_json_as_a_folder_turns_the_disk_tier_off_and_as_a_link_is_never_written_through(
    tmp_path: Path,
) -> None:
    ns = namespace_dir(tmp_path)
    meta = ns / "namespace.json"
    meta.unlink()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    meta.symlink_to(target)
    e = make(tmp_path)
    assert e.cache.has_disk
    assert target.read_text() == "keep me"
    assert not meta.is_symlink()
    meta.unlink()
    meta.mkdir()
    assert make(tmp_path).cache.stats().disk_error is not None


def test_a_cache_folder_deleted_while_running_costs_writes_not_requests(tmp_path: Path) -> None:
    e = make(tmp_path / "kv")
    serve_one(e)
    e.cache.flush()
    for p in sorted((tmp_path / "kv").rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() else p.rmdir()
    (tmp_path / "kv").rmdir()
    r = e.render_chat([{"role": "user", "content": "Name a fruit, then another."}])
    list(e.generate(r.token_ids, SamplingParams(max_tokens=4, temperature=0), cache_req=CacheRequest(r.boundaries)))
    e.cache.flush()
    assert list((tmp_path / "kv").glob(f"*/*{SUFFIX}"))  # the folder was made anew and written to


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid"), reason="POSIX only")
def test_a_read_only_cache_folder_never_stops_the_start(tmp_path: Path) -> None:
    """As root permissions do not bind, so the folder is read-only only for other users; either way the
    engine starts and serves."""
    folder = tmp_path / "kv"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        e = make(folder)
        assert serve_one(e).completion_tokens == 4
    finally:
        folder.chmod(0o700)


def test_cache_verify_finds_damaged_files_and_repair_removes_them(tmp_path: Path) -> None:
    e = make(tmp_path)
    serve_one(e)
    e.cache.flush()
    chunks = sorted(tmp_path.glob(f"*/*{SUFFIX}"))
    assert chunks
    data = bytearray(chunks[0].read_bytes())
    data[-10] ^= 0xFF  # a flipped bit inside the tensors: only the checksum sees it
    chunks[0].write_bytes(bytes(data))
    (tmp_path / "history.bin").write_bytes(b"garbage")

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "anchorkv", "cache", "verify", "--cache-dir", str(tmp_path), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    found = verify()
    assert found.returncode == 1
    assert f"{len(chunks) - 1} chunk files verified, 2 bad" in found.stdout
    assert "checksum" in found.stdout
    assert verify("--repair").returncode == 0
    assert not chunks[0].exists()
    assert (tmp_path / "history.bin.bad").exists()
    again = verify()
    assert again.returncode == 0
    assert ", 0 bad" in again.stdout


@contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on folder, where this runs as root and may mount; skipped elsewhere, saying so."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """3 MiB."""
    with tmpfs(tmp_path / "small", "size=3m") as folder:
        yield folder


def test_a_read_only_file_system_turns_the_disk_tier_off(tmp_path: Path) -> None:
    """Read-only even for root: the engine starts, serves, and says why the disk tier is off."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        e = make(folder)
        assert not e.cache.has_disk
        assert "Read-only file system" in str(e.cache.stats().disk_error)
        assert serve_one(e).completion_tokens == 4


def test_a_full_disk_stops_writes_once_and_serving_goes_on(small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    e = make(small_disk)
    for i in range(6):
        r = e.render_chat([{"role": "user", "content": f"Topic {i}: " + "tell me more. " * 60}])
        done = list(
            e.generate(r.token_ids, SamplingParams(max_tokens=2, temperature=0), cache_req=CacheRequest(r.boundaries))
        )
        assert isinstance(done[-1], Finished)
    e.cache.flush()
    stats = e.cache.stats().disk
    assert stats is not None
    assert stats.full
    on_disk = list(small_disk.glob(f"*/*{SUFFIX}"))
    assert stats.entries == len(on_disk)
    full = sum("is full" in m for m in caplog.messages)
    assert 1 <= full <= sum("room again" in m for m in caplog.messages) + 1  # once an episode, not once a write


@pytest.mark.parametrize("damage", ["{", '{"floor": 7}', '{"floor": "48"}', '{"floor": 100000}', "[]"])
def test_a_damaged_remembered_row_floor_is_measured_again(tmp_path: Path, damage: str) -> None:
    """The prefill linears' start-up check is remembered under the kernels folder; a file that does not
    hold one of the floors it tries is measured again and rewritten, never trusted."""
    linears = [Linear(torch.randn(96, 64, generator=torch.Generator().manual_seed(0)).bfloat16())]
    check = functools.partial(prefill_row_floor, linears, 80, torch.bfloat16, torch.device("cpu"), "matmul", tmp_path)
    measured = check()
    (remembered,) = tmp_path.glob("prefill-rows-*.json")
    remembered.write_text(damage)
    linears[0].min_rows = 7
    assert check() == measured
    assert linears[0].min_rows == (measured or 0)
    assert json.loads(remembered.read_text())["floor"] == measured
