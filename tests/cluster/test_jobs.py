"""Cluster jobs against a real Ray head (dashboard + Jobs API) with token authentication."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

VENV_BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A Ray head with the dashboard and RAY_AUTH_MODE=token, stopped by PID afterwards."""
    token = secrets.token_hex(16)
    port, dash = _free_port(), _free_port()
    temp_dir = str(tmp_path_factory.mktemp("rayhead"))
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    proc = subprocess.Popen(
        [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    import urllib.request

    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(address + "/api/version", timeout=2)
            break
        except Exception as exc:  # 401 also means the server is up
            if getattr(exc, "code", None) in (401, 403):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"Ray head did not start: {exc}")
            time.sleep(1)
    try:
        yield address, token
    finally:
        # Kill the whole process group started for this head (never `ray stop`: it would
        # kill every Ray runtime on the machine, the test session's included).
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)


def _vitray(args, env, timeout=180):
    return subprocess.run([os.path.join(VENV_BIN, "vitray"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_follow_and_status_with_token(token_cluster):
    address, token = token_cluster
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, AWS_SECRET_ACCESS_KEY="must-not-leak")
    out = _vitray(["job", "submit", "--address", address, "--follow", "--", "--version"], env)
    assert out.returncode == 0, out.stderr
    sid = out.stdout.splitlines()[0].strip()
    assert "vitray 0." in out.stdout and "SUCCEEDED" in out.stdout
    st = _vitray(["job", "status", "--address", address, sid], env)
    assert st.returncode == 0 and '"SUCCEEDED"' in st.stdout
    listed = _vitray(["job", "list", "--address", address], env)
    assert sid in listed.stdout
    # The job's metadata and runtime env (as the cluster stored them) carry no secrets.
    assert '"vitray_stage": "--version"' in st.stdout
    assert "must-not-leak" not in st.stdout and "vitray-test-secret" not in st.stdout and token not in st.stdout


def test_client_without_token_is_refused(token_cluster):
    address, _ = token_cluster
    out = _vitray(["job", "list", "--address", address], _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="wrong-token"))
    assert out.returncode != 0
    assert "401" in out.stderr or "403" in out.stderr or "uthenticat" in out.stderr
