"""Real Ray clusters on this machine for tests: a head (dashboard and job server included) and
optional worker nodes, each a `ray start` of its own.

Every node gets its own free ports and runs in a session of its own, so the cluster is
stopped (or one node killed, as a node failure) by signalling exactly that session's
processes (and their children) — never `ray stop`, which stops every Ray on the machine,
other people's included. Nodes are started the way an operator starts a venv-based
cluster: with the venv first on PATH, so a job's `python` is the venv's. Token auth is
off for these private clusters, so results do not depend on the test process's Ray auth
state (which a local ray.init() elsewhere in the session switches on).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

VENV_BIN = Path(sys.executable).parent


# --- the processes of one session ---------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a live process; None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else (int(fields[1]), int(fields[3]))


def session_processes(sid: int) -> list[int]:
    """Every process of session `sid`, plus every descendant of one (a Ray job's entrypoint
    runs in a session of its own, as a child of a worker of ours)."""
    stats = {pid: st for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()) if (st := _proc_stat(pid))}
    found = {pid for pid, (_, s) in stats.items() if s == sid}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    found.discard(os.getpid())
    return sorted(found)


def kill_session(sid: int, grace_s: float = 3) -> None:
    """SIGTERM, then SIGKILL what is left after `grace_s` (gcs_server and the autoscaler
    monitor can sit on a SIGTERM for longer; these clusters are throwaway)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = session_processes(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_processes(sid):
            return


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# --- nodes ----------------------------------------------------------------------------------


@dataclass
class RayCluster:
    address: str  # the dashboard / job server URL
    gcs: str  # host:port that nodes join
    temp_dir: str
    env: dict[str, str]
    sids: list[int] = field(default_factory=list)  # one session per node, the head's first

    def processes(self) -> list[int]:
        return sorted(pid for sid in self.sids for pid in session_processes(sid))

    def add_node(self, num_cpus: int) -> int:
        """Start a worker node; returns its session id (kill_session(sid) is a node failure).

        Each node has a temp dir of its own, as on separate machines: nodes sharing one
        would share `runtime_resources/`, and one node's runtime-env agent would delete a
        job's working dir while another node's processes still run in it."""
        temp_dir = tempfile.mkdtemp(prefix=f"n{len(self.sids)}-", dir=self.temp_dir)
        args = ["--address", self.gcs, f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", *_node_ports()]
        _, sid = _ray_start(args, {**self.env, "RAY_TMPDIR": temp_dir}, temp_dir)
        self.sids.append(sid)
        return sid

    def stop(self) -> None:
        for sid in reversed(self.sids):
            kill_session(sid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _node_ports() -> list[str]:
    flags = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
    return [f"{flag}={free_port()}" for flag in flags]


def _diagnostics(temp_dir: str, start_output: str) -> str:
    logs = sorted(Path(temp_dir).glob("session_*/logs/dashboard*.*")) + sorted(Path(temp_dir).glob("session_*/logs/*.err"))
    tails = [f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:] for p in logs if p.stat().st_size]
    return "\n".join([f"--- ray start\n{start_output[-4000:]}", *tails])


class RayStartError(RuntimeError):
    pass


def _ray_start(args: list[str], env: dict[str, str], temp_dir: str, tries: int = 2) -> tuple[str, int]:
    """`ray start ARGS` in a session of its own; returns (its output, the session id). On a
    loaded machine a node can miss Ray's registration deadline: it is tried once more."""
    for attempt in range(1, tries + 1):
        try:
            return _ray_start_once(args, env, temp_dir)
        except RayStartError:
            if attempt == tries:
                raise
    raise AssertionError("unreachable")


def _ray_start_once(args: list[str], env: dict[str, str], temp_dir: str) -> tuple[str, int]:
    cmd = [str(VENV_BIN / "ray"), "start", "--disable-usage-stats", f"--object-store-memory={200 * 1024 * 1024}", *args]
    start = subprocess.Popen(cmd, env=env, cwd=temp_dir, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sid = start.pid  # session leader: every Ray process it starts stays in this session
    try:
        output, _ = start.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        start.kill()
        kill_session(sid)
        raise RayStartError(f"`{' '.join(cmd)}` did not finish in 180 s") from None
    if start.returncode != 0:
        kill_session(sid)
        raise RayStartError(f"`ray start` exited {start.returncode}\n{_diagnostics(temp_dir, output)}")
    return output, sid


def _dashboard_ready(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_cluster(head_cpus: int = 2, worker_cpus: list[int] = (), env: dict[str, str] | None = None) -> RayCluster:
    """A head with the dashboard and job server on 127.0.0.1, plus a worker node per entry of
    `worker_cpus`. `env` adds variables to every node (and so to every job and worker)."""
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's unix sockets live here
    dashboard_port, gcs_port = free_port(), free_port()
    node_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    node_env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        VIRTUAL_ENV=str(VENV_BIN.parent),
        RAY_TMPDIR=temp_dir,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        **(env or {}),
    )
    cluster = RayCluster(f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}", temp_dir, node_env)
    head = [
        "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true", f"--num-cpus={head_cpus}", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}", *_node_ports(),
    ]  # fmt: skip
    try:
        output, sid = _ray_start(head, node_env, temp_dir)
        cluster.sids.append(sid)
        deadline = time.monotonic() + 300  # a guard against a hang; a loaded machine may be slow
        while not _dashboard_ready(cluster.address):
            if time.monotonic() > deadline:
                raise RayStartError(f"the Ray dashboard at {cluster.address} did not answer within 300 s\n{_diagnostics(temp_dir, output)}")
            time.sleep(0.5)
        for cpus in worker_cpus:
            cluster.add_node(cpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster
