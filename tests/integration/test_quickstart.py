"""The quickstart refuses a taken Flower port with one line naming the port and the flag."""

from __future__ import annotations

import socket
import subprocess
import sys

from harness.processes import REPO_ROOT


def test_taken_flower_port_is_one_clear_line_and_exit_2() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "harness.quickstart", "--exit", "--flower-port", str(port)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"port {port} (Flower) is taken" in lines[0]
    assert "--flower-port" in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
