"""A real one-node SLURM cluster on localhost, for testing the project's sbatch scripts.

``SlurmCluster(root)`` writes a minimal ``slurm.conf`` with every path under ``root`` and starts
``munged`` (its own key and socket), ``slurmctld`` and ``slurmd`` as the current (root) user, on two
free TCP ports, so it touches nothing of the machine's own SLURM or munge and several clusters can
run side by side. The ``slurm_cluster`` fixture yields a started cluster and, on teardown, cancels
every job, then stops the daemons by the PIDs in their pid files (never by process name).

Every client command needs ``SLURM_CONF``: use ``cluster.env`` (or ``cluster.run``), which jobs then
inherit.

``TwoNodeCluster`` (fixture ``two_node_cluster``) is the same with two compute nodes, each slurmd in
a network namespace of its own (``.ci/slurm_netns.sh``).

Usage::

    from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch(["--wrap", "hostname"])
        assert slurm_cluster.wait(job)["JobState"] == "COMPLETED"
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def missing_binaries() -> list[str]:
    """The SLURM/munge programs this fixture needs that are not installed (.ci/install_slurm.sh)."""
    return [name for name in DAEMONS + CLIENTS if _sbin(name) == name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


class SlurmCluster:
    """One controller and one compute node on 127.0.0.1, all state under ``root``."""

    def __init__(self, root: Path, cpus: int = 4) -> None:
        self.root = Path(root)
        # With SlurmdParameters=config_overrides the node may claim more CPUs than the machine has,
        # so small array tasks run side by side even on a 2-core machine.
        self.cpus = cpus
        self.ctl_host = socket.gethostname().split(".")[0]
        self.ctl_addr = "127.0.0.1"
        self.nodes = {self.ctl_host: "127.0.0.1"}  # node name -> NodeAddr
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env.pop("SLURM_JOB_ID", None)  # never look like we already run inside a job
        self._procs: list[subprocess.Popen] = []
        self._pidfiles = {
            "munged": self.root / "munge" / "munged.pid",
            "slurmctld": self.root / "run" / "slurmctld.pid",
        }

    # --- configuration -------------------------------------------------------------------
    def _write_conf(self) -> None:
        for sub in ("etc", "munge", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # munged refuses a socket directory of mode 700
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        r = self.root
        lines = [
            "ClusterName=p2pztest",
            f"SlurmctldHost={self.ctl_host}({self.ctl_addr})",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "MailProg=/bin/true",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",  # no cgroups in containers; follows child processes
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "KillWait=5",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",  # %n: the node's name (one slurmd per node)
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
        ]
        for node, addr in self.nodes.items():
            lines.append(
                f"NodeName={node} NodeAddr={addr} CPUs={self.cpus} Boards=1 SocketsPerBoard=1 "
                f"CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={int(mem_mb * 0.9)} State=UNKNOWN"
            )
        nodes = ",".join(self.nodes)
        lines.append(f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> SlurmCluster:
        self._write_conf()
        m = self.root / "munge"
        self._daemon(
            [
                _sbin("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={m}/munge.key",
                f"--log-file={m}/munged.log",
                f"--pid-file={m}/munged.pid",
                f"--seed-file={m}/munged.seed",
            ],
            host=None,  # the machine itself: every host reaches its Unix socket
        )
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged to open its socket")
        started = time.time()
        self._daemon([_sbin("slurmctld"), "-D", "-f", str(self.conf)], self.ctl_host)
        self._wait_for(
            lambda: self.run(["scontrol", "ping"], check=False).returncode == 0,
            timeout,
            "slurmctld to answer",
        )
        for node in self.nodes:
            self._daemon([_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", node], node)
        self._wait_for(lambda: self._nodes_ready(started), timeout, "the nodes to be idle")
        return self

    def _on(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` as run on ``host`` (a node's name, or the controller's): here, all are this machine."""
        return argv

    def _daemon(self, argv: list[str], host: str | None) -> None:
        # In the foreground, as our children: we reap them when they stop (a container's init
        # may not), and they still write their pid files, by which stop() finds them.
        log = open(self.root / "log" / f"{Path(argv[0]).name}-{host or 'local'}.stderr", "ab")
        self._procs.append(
            subprocess.Popen(
                argv if host is None else self._on(host, argv),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()

    def _nodes_ready(self, started: float) -> bool:
        """Every node idle, registered by a slurmd started by us (not a stale record)."""
        out = self.run(["scontrol", "show", "node", "-o"], check=False).stdout
        records = {r.get("NodeName"): r for r in map(_fields, out.splitlines())}
        for node in self.nodes:
            record = records.get(node, {})
            if record.get("State") != "IDLE":
                return False
            try:
                stamp = time.strptime(record.get("SlurmdStartTime", ""), "%Y-%m-%dT%H:%M:%S")
            except ValueError:
                return False
            if time.mktime(stamp) < int(started) - 1:
                return False
        return True

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}; logs in {self.root / 'log'}:\n{self.logs()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job, wait for them to go, then stop the daemons by their pid files."""
        if self._pid("slurmctld"):
            self.run(["scancel", "--partition=debug"], check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.3)
        # Job processes that outlived their job (a hung slurmstepd) carry this cluster's SLURM_CONF.
        for pid in self._job_processes():
            _signal(pid, signal.SIGKILL)
        for name in [*(f"slurmd-{node}" for node in self.nodes), "slurmctld", "munged"]:
            pid = self._pid(name)
            if pid is None:
                continue
            _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        for proc in self._procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _pid(self, name: str) -> int | None:
        path = self._pidfiles.get(name, self.root / "run" / f"{name}.pid")
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def _job_processes(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        daemons = {self._pid(n) for n in ("munged", "slurmctld", *(f"slurmd-{node}" for node in self.nodes))}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in daemons or int(entry.name) == os.getpid():
                continue
            try:
                # slurmctld's own helper (slurmscriptd) goes with it; killed first, it held up
                # slurmctld's shutdown for the whole 30 s timeout
                if int((entry / "stat").read_text().rpartition(") ")[2].split()[1]) in daemons:
                    continue
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    # --- clients -------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; text output captured."""
        result = subprocess.run(
            self._on(self.ctl_host, list(argv)),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def sbatch(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit without waiting; returns the job id (``sbatch --parsable``)."""
        result = subprocess.run(
            self._on(self.ctl_host, ["sbatch", "--parsable", *args]),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` as one dict per job record (an array job gives one per task)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return [_fields(line) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict[str, str]:
        """Poll until the job (every task of an array) has finished; returns the last record.

        Faster than ``sbatch --wait``, whose polling interval grows to ~10 s.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.job(job_id)
            if records and all(r.get("JobState") in FINISHED_STATES for r in records):
                return records[-1]
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still not finished after {timeout} s: {self.job(job_id)}")

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120.0) -> dict[str, str]:
        """Poll until the job's state is one of ``states``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.job(job_id)
            if records and records[-1].get("JobState") in states:
                return records[-1]
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} never reached {states}: {self.job(job_id)}")

    def logs(self) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if log.exists():
                parts.append(f"--- {log.name} (tail)\n" + "\n".join(log.read_text().splitlines()[-20:]))
        return "\n".join(parts)


class TwoNodeCluster(SlurmCluster):
    """slurmctld and two slurmd, each in a network namespace of its own, joined by a bridge.

    ``.ci/slurm_netns.sh`` makes the namespaces (``<prefix>-ctl``, ``-node1``, ``-node2``; the addresses
    10.200.0.x exist only inside them) and runs each daemon there with the host's name as its hostname
    and the cluster's own ``/etc/hosts``, as on separate machines: jobs on ``node1`` reach ``node2`` only
    over that bridge. munged is shared (a Unix socket, which namespaces of the network do not separate).
    Client commands run in the controller's namespace. Needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN.
    """

    SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "slurm_netns.sh"

    def __init__(self, root: Path, cpus: int = 8) -> None:
        super().__init__(root, cpus)
        self.prefix = f"p2pz{os.getpid()}x{_free_port()}"  # unique among clusters running side by side
        self.ctl_host, self.ctl_addr = "ctl", "10.200.0.1"
        self.nodes = {"node1": "10.200.0.11", "node2": "10.200.0.12"}

    def start(self, timeout: float = 60.0) -> TwoNodeCluster:
        (self.root / "net").mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["bash", str(self.SCRIPT), "up", self.prefix, str(self.root / "net"), self.ctl_host, *self.nodes],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            self._remove_namespaces()
            why = (result.stderr or result.stdout).strip()
            raise NamespacesRefused(f"{self.SCRIPT.name} up failed: {why}")
        super().start(timeout)
        return self

    def _on(self, host: str, argv: list[str]) -> list[str]:
        return ["bash", str(self.SCRIPT), "run", self.prefix, str(self.root / "net"), host, *argv]

    def stop(self, timeout: float = 30.0) -> None:
        try:
            super().stop(timeout)
        finally:
            self._remove_namespaces()

    def _remove_namespaces(self) -> None:
        subprocess.run(["bash", str(self.SCRIPT), "down", self.prefix], capture_output=True, timeout=60)


class NamespacesRefused(RuntimeError):
    """The machine would not make the network namespaces (no CAP_NET_ADMIN, a locked-down container)."""


def _fields(line: str) -> dict[str, str]:
    """Parse ``scontrol show -o`` output (``Key=Value`` pairs separated by spaces)."""
    out = {}
    for token in line.split():
        if "=" in token:
            key, _, value = token.partition("=")
            out.setdefault(key, value)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A started one-node cluster shared by a test module; skipped where SLURM is not installed."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}); run .ci/install_slurm.sh as root")
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster runs its daemons as root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory) -> Iterator[TwoNodeCluster]:
    """A started two-node cluster (:class:`TwoNodeCluster`) shared by a test module; skipped, saying
    what refused, where SLURM is not installed or the network namespaces cannot be made."""
    tools = ("ip", "nsenter", "unshare", "mount")
    missing = missing_binaries() + [name for name in tools if _sbin(name) == name]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}; run .ci/install_slurm.sh as root")
    if os.geteuid() != 0:
        pytest.skip("the two-node SLURM cluster makes network namespaces and runs its daemons as root")
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("slurm2"))
    try:
        try:
            cluster.start()
        except NamespacesRefused as refused:
            pytest.skip(str(refused))
        yield cluster
    finally:
        cluster.stop()
