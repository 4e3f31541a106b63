"""Run any vitray stage as a Ray job on a cluster: submit, follow, status, stop.

A job's entrypoint is the very same ``vitray ...`` command line a user runs
locally (MAE's habit: the launcher reuses the trainer's own arguments), so a
local run and a cluster run cannot drift apart.

Secrets never travel with a job: the runtime environment and job metadata hold
only the command, the vitray version and non-secret settings; cloud credentials
come from the cluster nodes' own chain (instance roles, mounted config). Clusters
with token authentication (``RAY_AUTH_MODE=token``) get the token from Ray's
standard sources (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``); the client sends it as a bearer header.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shlex
import sys
import time
from typing import Callable, Sequence

import vitray

# Environment variables a job may inherit from the submitter: settings, not secrets.
FORWARDED_ENV = ("RAY_USAGE_STATS_ENABLED", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_DEFAULT_REGION", "AWS_REGION")
_SECRET_PATTERN = re.compile(r"(SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY|PRIVATE)", re.I)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60.0
"""How long a submission waits for the head's job agent to come up."""


@dataclasses.dataclass
class JobSpec:
    """What to run on the cluster."""

    args: list[str]
    """The vitray command line without the leading ``vitray``, e.g. ``["shard", "s3://a", "s3://b"]``."""
    address: str | None = None
    """Dashboard address (``http://head:8265``). Default: RAY_ADDRESS / RAY_API_SERVER_ADDRESS."""
    submission_id: str | None = None
    working_dir: str | None = None
    """Upload this directory with the job (e.g. the vitray checkout when the cluster image lacks it)."""
    pip: list[str] = dataclasses.field(default_factory=list)
    """Extra pip requirements installed for the job."""
    num_cpus: float = 0
    """CPUs reserved for the driver process itself (the stage's own tasks request their own)."""


def _check_not_secret(env: dict[str, str]) -> None:
    for key in env:
        if _SECRET_PATTERN.search(key):
            raise ValueError(f"refusing to send environment variable {key} with a job: secrets must come "
                             "from the cluster's own credential chain, not job metadata")


def entrypoint(args: Sequence[str]) -> str:
    """The shell command a job runs: the local CLI's command line, quoted."""
    return " ".join(["vitray", *map(shlex.quote, args)])


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(spec: JobSpec) -> str:
    """Submit ``spec``; returns the submission id."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _check_not_secret(env)
    runtime_env: dict = {"env_vars": env}
    if spec.working_dir:
        runtime_env["working_dir"] = spec.working_dir
    if spec.pip:
        runtime_env["pip"] = list(spec.pip)
    metadata = {"vitray_version": vitray.__version__, "vitray_stage": spec.args[0] if spec.args else ""}
    client = _client(spec.address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint(spec.args), submission_id=spec.submission_id, runtime_env=runtime_env,
                metadata=metadata, entrypoint_num_cpus=spec.num_cpus)
        except RuntimeError as exc:
            # A freshly started head serves the dashboard before its job agent registers.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def status(submission_id: str, address: str | None = None) -> dict:
    """Status, message and timing of a job, as plain data."""
    info = _client(address).get_job_info(submission_id)
    return {"submission_id": submission_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time, "metadata": info.metadata, "runtime_env": info.runtime_env}


def list_jobs(address: str | None = None) -> list[dict]:
    return [{"submission_id": j.submission_id, "status": str(getattr(j.status, "value", j.status)),
             "entrypoint": j.entrypoint} for j in _client(address).list_jobs()]


def stop(submission_id: str, address: str | None = None, wait_s: float = 30.0) -> str:
    """Ask the job to stop and wait until it reaches a terminal state; returns that state."""
    client = _client(address)
    client.stop_job(submission_id)
    deadline = time.monotonic() + wait_s
    while True:
        state = str(getattr(client.get_job_status(submission_id), "value", client.get_job_status(submission_id)))
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def follow(submission_id: str, address: str | None = None, write: Callable[[str], object] = sys.stdout.write) -> str:
    """Stream the job's logs until it ends; returns the final status."""
    client = _client(address)

    async def _tail():
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    asyncio.run(_tail())
    # tail_job_logs ends when the job does; the status may lag a moment behind.
    for _ in range(60):
        state = str(getattr(client.get_job_status(submission_id), "value", client.get_job_status(submission_id)))
        if state in TERMINAL:
            return state
        time.sleep(0.5)
    return state


def logs(submission_id: str, address: str | None = None) -> str:
    return _client(address).get_job_logs(submission_id)
