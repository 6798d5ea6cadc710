"""The command line refuses bad values with exit status 2 and a message naming the flag."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from anchorkv.cli import main
from tests.conftest import free_port


@pytest.mark.parametrize(
    "args, flag",
    [
        (["serve", "--dtype", "float16"], "--dtype"),
        (["serve", "--stages", "0"], "--stages"),
        (["serve", "--threads", "0"], "--threads"),
        (["serve", "--chunk-size", "3"], "--chunk-size"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--temperature", "3"], "--temperature"),
        (["serve", "--turn-grace-ms", "-1"], "--turn-grace-ms"),
        (["bench", "engine", "--device", "tpu"], "--device"),
        (["bench", "stages", "--redis-tokens", "0"], "--redis-tokens"),  # an empty prompt: it used to hang
        (["bench", "compare", "--think-spread", "normal"], "--think-spread"),
        (["serve", "--model", "/nonexistent/model.gguf"], "--model: model not found"),
        (["serve", "--model", str(Path(__file__).parent)], "--model: "),  # a folder with no weights in it
        (["bench", "engine", "--model", "/nonexistent/model.gguf"], "--model: model not found"),
        (["serve", "--cache-home", __file__], "Not a directory"),  # the imported weights' folder cannot be made
    ],
)
def test_bad_flag_exits_2_naming_it(args: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2
    assert flag in capsys.readouterr().err


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
        "--turn-grace-ms",
    ]:
        assert flag in r.stdout


@pytest.mark.parametrize("value", ["sometimes", "auto:0", "-3"])
def test_bad_disk_prefix_cache_exits_2_listing_the_forms(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--disk-prefix-cache", value])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--disk-prefix-cache" in err
    assert "auto:N" in err


def _serve(port: int, folder: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "anchorkv",
        "serve",
        "--threads",
        "2",
        "--port",
        str(port),
        "--cache-dir",
        str(folder),
    ]


def test_serve_finishes_the_request_in_hand_on_sigterm(tmp_path: Path) -> None:
    """The engine runs on serve's main thread and HTTP beside it; a shutdown still drains the stream in flight.
    (A grace long enough for a loaded machine: the end of the grace period has its own test below.)"""
    proc, url = _started(tmp_path, "--shutdown-grace", "60")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # generating
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_a_stream_still_running_at_the_end_of_the_grace_period_ends_with_an_error_and_done(tmp_path: Path) -> None:
    proc, url = _started(tmp_path, "--shutdown-grace", "3")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert "shutting down" in rest[-2]
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


BROKEN_ENGINE = """
import sys, uvicorn
from anchorkv.config import EngineConfig, ServerConfig
from anchorkv.engine.engine import Engine
from anchorkv.server.app import create_app
from anchorkv.server.worker import serve_on_main_thread

engine = Engine(EngineConfig(threads=2, ctx=64, parallel=1))
def broken(*args, **kwargs):
    raise RuntimeError("a bug in the scheduler")
engine.step = engine.fail_all = broken  # a fault that even failing the requests in hand cannot survive
app = create_app(engine, ServerConfig(), start_worker=False)
config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), timeout_graceful_shutdown=60)
serve_on_main_thread(uvicorn.Server(config), app.state.worker)
"""


def test_serve_stops_http_when_its_engine_loop_dies_instead_of_hanging_clients() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BROKEN_ENGINE, str(port)], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _health(url):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        body = {"prompt": "Once upon a time", "max_tokens": 4}
        try:  # the request ends, with an error or a closed connection, instead of waiting for ever
            ended = httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code >= 500
        except httpx.TimeoutException:
            ended = False
        except httpx.TransportError:
            ended = True
        assert ended
        assert proc.wait(timeout=30) != 0
        assert proc.stderr is not None and b"a bug in the scheduler" in proc.stderr.read()
    finally:
        proc.kill()


def test_serve_exits_1_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        r = subprocess.run(_serve(held.getsockname()[1], tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "address already in use" in r.stderr


def _started(folder: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    """`anchorkv serve` on a free port, once it answers /health."""
    port = free_port()
    proc = subprocess.Popen([*_serve(port, folder), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not _health(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"anchorkv serve did not start (exit {proc.poll()})")
        time.sleep(0.2)
    return proc, url


def _health(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
