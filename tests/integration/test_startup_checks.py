"""Start-up refusals, with real processes: `python -m listener` and `celery -A worker worker`.

A setting that cannot work stops the process before it does anything: exit code 2, one line naming
the variable (or flag), passwords masked; never `listener ready` followed by a crash at the first event.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from changeflow.listener.exit_codes import EXIT_USAGE
from harness.redis_server import RedisServer
from tests.integration.test_listener_cli import ROOT, Process, env, processes  # noqa: F401 (fixtures)

SECRET = "hunter2-secret"
STARTUP_LIMIT = 20.0  # seconds: a refusal is immediate, the rest is Python's start-up on a loaded machine


def refused(process: Process, *names: str) -> str:
    code = process.finish(timeout=STARTUP_LIMIT)
    output = process.output
    assert code == EXIT_USAGE, f"exit code {code}; the listener said:\n{output}"
    for name in names:
        assert name in output, f"{name} not named; the listener said:\n{output}"
    assert SECRET not in output
    assert "listener ready" not in output
    assert "Traceback" not in output
    return output


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DEDUP_TTL_SECONDS", "0"),
        ("SMTP_PORT", "99999"),
        ("LISTENER_MAX_AWAIT_MS", "0"),
        ("LISTENER_BATCH_SIZE", "0"),
        ("LISTENER_MAX_QUEUE_LENGTH", "-5"),
        ("LISTENER_METRICS_PORT", "70000"),
        ("METRICS_HOST", "not a host"),
        # Brokers the listener's publisher (and the workers' dedup store) cannot use: before, the
        # listener said `listener ready`, then died at the first event with the password in clear.
        ("CELERY_BROKER_URL", f"amqp://guest:{SECRET}@127.0.0.1:5672//"),
        ("CELERY_BROKER_URL", f"memory://:{SECRET}@localhost/"),
        ("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:70000/0"),
        ("MONGODB_URI", f"mongodb://app:{SECRET}@127.0.0.1:99999/?replicaSet=rs0"),
    ],
)
def test_the_listener_refuses_a_setting_that_cannot_work(
    env: dict[str, str],  # noqa: F811
    processes: list[Process],  # noqa: F811
    variable: str,
    value: str,
) -> None:
    process = Process({**env, variable: value})
    processes.append(process)
    output = refused(process, variable)
    lines = [line for line in output.splitlines() if "invalid settings" in line]
    assert len(lines) == 1, output
    if SECRET in value:
        assert "****" in lines[0]  # the URL is shown masked


def test_an_empty_stream_name_is_refused_not_replaced_by_the_default(
    env: dict[str, str],  # noqa: F811
    processes: list[Process],  # noqa: F811
) -> None:
    process = Process(env, "--stream-name", "")
    processes.append(process)
    refused(process, "--stream-name must not be empty")


def test_an_unwritable_health_file_is_refused_at_start(
    env: dict[str, str],  # noqa: F811
    processes: list[Process],  # noqa: F811
    tmp_path: Path,
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")  # a directory by that name cannot exist: even root cannot write there
    process = Process(env, "--health-file", str(not_a_directory / "health.json"))
    processes.append(process)
    refused(process, "--health-file", str(not_a_directory / "health.json"))

    from_env = Process({**env, "LISTENER_HEALTH_FILE": str(not_a_directory / "h.json")})
    processes.append(from_env)
    refused(from_env, "LISTENER_HEALTH_FILE")


def test_a_metrics_port_in_use_is_refused_at_start(
    env: dict[str, str],  # noqa: F811
    processes: list[Process],  # noqa: F811
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = Process({**env, "LISTENER_METRICS_PORT": str(port)})
        processes.append(process)
        refused(process, f"LISTENER_METRICS_PORT: cannot serve metrics on 127.0.0.1:{port}")


def test_credentials_mongodb_refuses_stop_the_listener_with_the_usage_code(
    env: dict[str, str],  # noqa: F811
    processes: list[Process],  # noqa: F811
    mongodb_uri: str,
    real_mongodb: bool,
) -> None:
    if real_mongodb:
        pytest.skip("needs a server without the user app (the MongoDB test server has no users)")
    # The MongoDB test server answers every authentication as mongod does for a user it does not
    # know: AuthenticationFailed (18). Before, the listener retried it for ever as a network error.
    uri = mongodb_uri.replace("mongodb://", f"mongodb://app:{SECRET}@", 1)
    started = time.monotonic()
    process = Process({**env, "MONGODB_URI": uri})
    processes.append(process)
    output = refused(process, "MONGODB_URI (mongodb://app:****@", "Authentication failed.", "code 18")
    assert time.monotonic() - started < STARTUP_LIMIT
    assert "retrying" not in output


# The `celery` console script installed beside this Python (the virtualenv's bin, on PATH or not).
CELERY = str(Path(sys.executable).with_name("celery"))


def test_the_worker_refuses_bad_settings_in_one_line(redis_server: RedisServer, tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CELERY_BROKER_URL": f"redis://:{SECRET}@127.0.0.1:{redis_server.port}/0",
        "DEDUP_TTL_SECONDS": "0",
    }
    for command in ([CELERY], [sys.executable, "-m", "celery"]):
        done = subprocess.run(
            [*command, "-A", "worker", "worker", "--loglevel", "INFO"],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == EXIT_USAGE, done.stderr
        assert done.stderr.strip().splitlines() == [
            "invalid settings: DEDUP_TTL_SECONDS must be at least 1, got 0"
        ]

    broker = {**environment, "DEDUP_TTL_SECONDS": "", "CELERY_BROKER_URL": f"amqp://guest:{SECRET}@rabbit//"}
    done = subprocess.run(
        [CELERY, "-A", "worker", "worker"],
        cwd=ROOT,
        env=broker,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "CELERY_BROKER_URL" in done.stderr and "amqp://guest:****@rabbit//" in done.stderr
    assert SECRET not in done.stderr + done.stdout
