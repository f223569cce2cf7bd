"""A real two-node SLURM cluster on this machine, for the tests: munged, slurmctld and two slurmd daemons.

Each node is a network namespace of its own (``ip netns``), joined to the other by a veth pair: node ``n1``
at 10.77.0.1 and ``n2`` at 10.77.0.2, each end named ``kdnet0`` inside its namespace. Traffic between the
nodes crosses that link and nothing else: the namespaces share no other interface. slurmctld lives in
``n1``'s namespace. The file system is shared, so one munged, whose socket is a file, serves both nodes.

Only the network namespace is entered (``nsenter --net``): ``ip netns exec`` would also remount /sys, which
hides the cgroup file systems that slurmd insists on initialising.

Every daemon is a child of the test process, started in the foreground and stopped by its pid; the
namespaces and veth pair are removed again; a process still found inside a namespace at the end (a job's
task that outlived its step) is killed by pid before the namespace goes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "ip", "nsenter")
PACKAGES = ("slurm-wlm", "munge", "iproute2", "util-linux")
INTERFACE = "kdnet0"
SUBNET = "10.77.0"
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def missing_tools() -> list[str]:
    return [
        tool for tool in TOOLS if shutil.which(tool, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}") is None
    ]


def cannot_run(reason: str) -> NoReturn:
    """Skips the calling test with ``reason``; fails it instead under ``LKD_REQUIRE_SLURM=1`` (CI)."""
    if os.environ.get("LKD_REQUIRE_SLURM", "") == "1":
        pytest.fail(f"LKD_REQUIRE_SLURM=1 and the SLURM tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def install_slurm() -> None:
    """``apt-get install`` the daemons and tools (root only; CI starts from a clean Debian machine).

    Raises ``RuntimeError`` with apt's own words when the package registry cannot be reached or refuses.
    """
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(command, env=env, capture_output=True).returncode == 0:
        return
    # a clean machine may have no package lists yet
    for step in (["apt-get", "update", "-q"], command):
        result = subprocess.run(step, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(step)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}\n"
                f"Install {' '.join(PACKAGES)} from the Debian package registry by hand, or let this machine "
                "reach it."
            )


@dataclass
class Job:
    """What ``scontrol show job`` says about a job."""

    id: int
    state: str
    reason: str
    restarts: int
    exit_code: str
    start_time: str
    raw: dict[str, str]


@dataclass
class Node:
    name: str
    address: str
    namespace: str
    veth: str


class SlurmCluster:
    """Two SLURM nodes in two network namespaces, with munged, slurmctld and slurmd under ``root``."""

    def __init__(self, root: Path, cpus_per_node: int = 2) -> None:
        self.root = Path(root)
        self.cpus_per_node = cpus_per_node
        owner = os.getpid()
        self.nodes = [Node(f"n{i}", f"{SUBNET}.{i}", f"lkd{owner}n{i}", f"lkd{owner}v{i}") for i in (1, 2)]
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket: Path | None = None  # set when munged starts
        self.interface = INTERFACE
        self._daemons: list[tuple[str, subprocess.Popen]] = []
        self._undo: list[tuple[str, Callable[[], None]]] = []

    # ---------------------------------------------------------------------------------------- clients

    @property
    def env(self) -> dict[str, str]:
        """The environment SLURM's client commands need: this cluster's slurm.conf and the daemons' PATH."""
        return {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": f"{os.environ.get('PATH', '')}:{SBIN_PATH}",
        }

    def run(
        self,
        *command: str,
        node: int = 0,
        check: bool = True,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Runs ``command`` inside a node's namespace (the first by default, where slurmctld listens)."""
        full = ["nsenter", f"--net=/run/netns/{self.nodes[node].namespace}", *command]
        result = subprocess.run(
            full, env=dict(env or self.env), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(
        self, script: Path, *options: str, args: tuple[str, ...] = (), env: Mapping[str, str], cwd: Path
    ) -> int:
        out = self.run("sbatch", "--parsable", *options, str(script), *args, env=env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> Job | None:
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return None
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
        return Job(
            job_id,
            fields.get("JobState", "?"),
            fields.get("Reason", ""),
            int(fields.get("Restarts", 0)),
            fields.get("ExitCode", ""),
            fields.get("StartTime", ""),
            fields,
        )

    def wait(
        self, job_id: int, until: Callable[[Job], bool], timeout: float, what: str, log: Path | None = None
    ) -> Job:
        """Polls the job until ``until(job)``; a requeued job waiting for its begin time is released at once.

        SLURM holds a requeued job back until ``now + cred_expire + 1`` (121 s by default) before it may
        start again; ``scontrol update StartTime=now`` lifts that, as a user may for their own job.
        """
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job is not None:
                if until(job):
                    return job
                if job.state == "PENDING" and job.reason == "BeginTime":
                    self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
                elif job.state in TERMINAL_STATES:
                    break
            time.sleep(0.25)
        tail = log.read_text(errors="replace")[-6000:] if log is not None and log.exists() else "(no log)"
        raise AssertionError(f"job {job_id} never reached: {what}; last seen {job}\n--- job log ---\n{tail}")

    def wait_done(self, job_id: int, timeout: float, log: Path | None = None) -> Job:
        return self.wait(job_id, lambda job: job.state in TERMINAL_STATES, timeout, "the end", log)

    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id), check=False)

    # ---------------------------------------------------------------------------------------- start

    def start(self) -> None:
        """Brings the cluster up; whatever was started is recorded, so ``stop`` undoes a half-done start."""
        for folder in ("etc", "state", "log", "run", *(f"spool/{n.name}" for n in self.nodes)):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        _remove_orphaned_namespaces()
        self._network()
        self._munge()
        self._write_config()
        first = self.nodes[0]
        self._daemon("slurmctld", first, ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait_for(
            lambda: self.run("scontrol", "ping", check=False).returncode == 0, 30, "slurmctld answers"
        )
        for node in self.nodes:
            self._daemon(f"slurmd-{node.name}", node, ["slurmd", "-D", "-N", node.name, "-f", str(self.conf)])
        self._wait_for(self._all_idle, 60, "every node idle in sinfo")

    def _network(self) -> None:
        a, b = self.nodes
        for node in self.nodes:
            _ip("netns", "add", node.namespace)
            self._undo.append(
                (f"namespace {node.namespace}", lambda ns=node.namespace: self._remove_namespace(ns))
            )
        # One veth pair is the only link between the two nodes; each end moves into its node's namespace.
        _ip("link", "add", a.veth, "type", "veth", "peer", "name", b.veth)
        # only needed if a move below fails: a pair still in the root namespace would outlive the test
        self._undo.append(
            (f"veth {a.veth}", lambda: subprocess.run(["ip", "link", "del", a.veth], capture_output=True))
        )
        for node in self.nodes:
            _ip("link", "set", node.veth, "netns", node.namespace)
            # the same name on both nodes, so one GLOO_SOCKET_IFNAME serves every rank
            _ip("-n", node.namespace, "link", "set", node.veth, "name", INTERFACE)
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", INTERFACE)
            _ip("-n", node.namespace, "link", "set", "lo", "up")
            _ip("-n", node.namespace, "link", "set", INTERFACE, "up")

    def _munge(self) -> None:
        # munged wants every folder above its socket open to all, and pytest's temporary folders are private
        folder = Path(tempfile.mkdtemp(prefix="lkd-munge-"))
        self._undo.append(("munge folder", lambda: shutil.rmtree(folder)))
        self.munge_socket = socket_path = folder / "munge.socket"
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # munged also refuses a key that others may read
        folder.chmod(0o755)
        command = [
            "munged",
            "--foreground",
            f"--socket={socket_path}",
            f"--key-file={key}",
            f"--pid-file={folder / 'munged.pid'}",
            f"--seed-file={folder / 'munged.seed'}",
            f"--log-file={folder / 'munged.log'}",
        ]
        self._daemon("munged", None, command)
        self._wait_for(socket_path.exists, 15, "munged's socket")

    def _write_config(self) -> None:
        r = self.root
        lines = [
            "ClusterName=lkdtest",
            # slurmctld only runs where its host name is the configured one; the address is where clients go
            f"SlurmctldHost={socket.gethostname().split('.')[0]}({self.nodes[0].address})",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            # no systemd and no cgroup hierarchy of our own: plain process tracking, no task binding
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            # both "nodes" share this machine's cores: take the CPU counts below as given
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            # SIGTERM to SIGKILL; SLURM's default is 30 s. The unwarned requeue of the tests waits it out.
            "KillWait=2",
            # keep finished jobs visible to `scontrol show job` for the whole test session
            "MinJobAge=3600",
            "InactiveLimit=0",
            *(
                f"NodeName={n.name} NodeAddr={n.address} CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
                for n in self.nodes
            ),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        # cgroup/v2 without systemd (a clean CI machine) needs this; cgroup/v1 ignores it
        (self.conf.parent / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    def _daemon(self, name: str, node: Node | None, command: list[str]) -> None:
        if node is not None:
            # nsenter execs the daemon, so the pid we hold is the daemon's own
            command = ["nsenter", f"--net=/run/netns/{node.namespace}", *command]
        out = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        out.close()
        self._daemons.append((name, process))
        self._undo.append((name, lambda: _stop(process)))
        time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at once ({process.returncode}):\n{self.logs()}")

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return all(states.get(node.name) == "idle" for node in self.nodes)

    def _wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self._daemons:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}) before {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # ---------------------------------------------------------------------------------------- stop

    def stop(self) -> None:
        """Cancels every job, stops every daemon and removes the namespaces; raises the first failure."""
        errors: list[str] = []
        if any(process.poll() is None for name, process in self._daemons if name == "slurmctld"):
            try:
                self.run("scancel", "--user=root", check=False, timeout=20)
                self._wait_for_no_jobs(30)
            except Exception as error:  # noqa: BLE001 (teardown goes on whatever happens)
                errors.append(f"cancelling jobs: {error}")
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as error:  # noqa: BLE001
                errors.append(f"{what}: {error}")
        if errors:
            raise RuntimeError("; ".join(errors))

    def _wait_for_no_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.strip():
                return
            time.sleep(0.5)

    def _remove_namespace(self, namespace: str) -> None:
        _kill_processes_in(namespace)
        _ip("netns", "delete", namespace)  # the veth end inside goes with it, and so does its peer


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _stop(process: subprocess.Popen, grace: float = 15) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _processes_in(namespace: str) -> list[int]:
    """Pids whose network namespace is ``namespace``: only what this cluster started lives there."""
    try:
        target = os.stat(f"/run/netns/{namespace}")
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


def _kill_processes_in(namespace: str) -> None:
    for _ in range(20):
        pids = _processes_in(namespace)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.25)
    raise RuntimeError(f"processes {_processes_in(namespace)} survive in namespace {namespace}")


def _remove_orphaned_namespaces() -> None:
    """Namespaces of earlier test sessions that died without cleaning up; the owner's pid is in the name."""
    if not os.path.isdir("/run/netns"):
        return
    for name in os.listdir("/run/netns"):
        found = re.fullmatch(r"lkd(\d+)n\d", name)
        if found and not os.path.exists(f"/proc/{found.group(1)}"):
            _kill_processes_in(name)
            _ip("netns", "delete", name)
