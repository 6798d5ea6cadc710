"""`bench compare` drives real server processes: a cold pass, a warm request, and one after a restart."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from anchorkv.bench import compare, peers, traces
from anchorkv.model.loader import bundled_model_path
from tests.conftest import THREADS, free_port


def test_compare_restarts_our_server_and_its_first_request_hits_the_disk(tmp_path: Path) -> None:
    session = traces.generate("gen:agent")[2].messages + [{"role": "assistant", "content": "Done."}]
    trace = tmp_path / "session.jsonl"
    trace.write_text(json.dumps({"messages": session}) + "\n")
    out = tmp_path / "out"
    md = compare.run(
        [peers.anchorkv()], bundled_model_path(), [str(trace)], out, THREADS, free_port(), 2, restart_after=str(trace)
    )
    runs = json.loads((out / "compare.json").read_text())["anchorkv"]
    assert len(runs[str(trace)]) == 3
    assert runs[str(trace)][0]["cached_tokens"] == 0  # a fresh folder is cold
    assert runs[str(trace)][2]["cached_tokens"] > 0
    after = runs["after restart"][0]
    assert after["error"] is None
    assert after["cached_tokens"] > 0
    assert after["ttft_ms"] is not None
    assert "after restart" in md
    assert (out / compare._slug(str(trace)) / "replay.png").is_file()
    assert all(s["tail_ms"] is not None for samples in runs.values() for s in samples)  # every stream had text
    assert "| end of stream after the last text (ms) |" in md
    rates = [float(line.split("|")[2]) for line in md.splitlines() if line.startswith(f"| {trace} |")]
    assert len(rates) == 1
    assert rates[0] > 0  # decode speed from the server's own timings


FAKE_PEER = """
import http.server, subprocess, sys
# a child that takes a second to obey SIGTERM, as vLLM's engine process does while it shuts down
subprocess.Popen([sys.executable, "-c", "import signal, time\\n"
                  "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1), exit(0)))\\ntime.sleep(600)"])
class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Models).serve_forever()
"""


def test_a_stopped_peer_leaves_no_process_to_compute_beside_the_next(tmp_path: Path) -> None:
    script = tmp_path / "peer.py"
    script.write_text(FAKE_PEER)
    peer = peers.Peer("fake", (sys.executable, str(script), "{port}"))
    with peers.ServerProcess(peer, tmp_path / "model.gguf", free_port(), 1, tmp_path / "run") as server:
        assert server.proc is not None
        group = server.proc.pid
        time.sleep(0.5)  # the child has started
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # every process of the server's group has exited
