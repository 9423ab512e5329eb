"""A throw-away SLURM cluster on this machine, for the SLURM test stage.

``Cluster.start(nodes)`` installs the Debian packages when they are missing, starts a
private ``munged`` (its own key and socket) and ``slurmctld`` + one ``slurmd`` per node in
the foreground as child processes, so they are stopped by the PIDs this module holds and
nothing of the machine's own setup (``/etc/slurm``, ``/run/munge``) is used or changed.
Every daemon reads the private ``slurm.conf`` through ``SLURM_CONF``; ports are chosen free.

``nodes=1`` is one node named after the host; ``nodes>1`` are emulated nodes ``n1..nN``
(one slurmd each, all on this host: they share its hostname, ``SLURMD_NODENAME`` tells
them apart). Needs root (slurmd runs jobs as their user; here everything is root).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol")
CPUS_PER_NODE = 4
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED")  # advertised, oversubscribed on purpose: jobs are tiny


class Unavailable(Exception):
    """SLURM cannot be run here (not root, no apt, install failed): the stage is skipped."""


def _missing_packages() -> list[str]:
    """Packages not installed (`dpkg -s` also succeeds for removed ones that left their
    configuration files behind)."""
    def installed(p: str) -> bool:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                           text=True)
        return r.returncode == 0 and r.stdout.strip() == "install ok installed"
    return [p for p in PACKAGES if not installed(p)]


def ensure_installed(log) -> None:
    """apt-get install the Debian packages when missing (CI: a fresh machine, root)."""
    if shutil.which("dpkg") is None:
        raise Unavailable("no dpkg: not a Debian machine")
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"packages {' '.join(missing)} missing and cannot be installed "
                          "(needs root and apt-get)")
    log(f"installing {' '.join(missing)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # keep the packages' post-install scripts from starting system daemons
    policy = Path("/usr/sbin/policy-rc.d")
    added = not policy.exists()
    if added:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise Unavailable(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
    finally:
        if added:
            policy.unlink()
    if _missing_packages():
        raise Unavailable(f"still missing after apt-get install: {' '.join(_missing_packages())}")


def _free_ports(n: int) -> list[int]:
    """``n`` consecutive free TCP ports on 127.0.0.1 (slurmd ports of emulated nodes are a
    range)."""
    for base in range(20000 + os.getpid() % 5000 * 8, 60000, 97):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise Unavailable("no free ports")


class Cluster:
    """A running cluster; use as ``with Cluster(dir, nodes) as c: c.sbatch(...)``."""

    def __init__(self, root: Path, nodes: int, log=print):
        self.root = Path(root)
        self.nodes = nodes
        self.log = log
        self.procs: dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]
        self.node_names = [self.host] if nodes == 1 else [f"n{i}" for i in range(1, nodes + 1)]
        self.env = dict(os.environ)

    # ---- lifecycle -------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("not root: slurmd must run as root to start jobs")
        ensure_installed(self.log)
        for d in ("munge", "log", "state", "spool", "tmp"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        conf = self._write_conf()
        self.env.update(SLURM_CONF=str(conf))
        # jobs inherit this environment (sbatch --export=ALL): no launcher variables of ours
        for k in [k for k in self.env if k.startswith(("SLURM_", "PMI_", "PMIX_", "HYDRA_"))
                  and k != "SLURM_CONF"]:
            del self.env[k]
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
        for n in self.node_names:
            (self.root / "spool" / n).mkdir(exist_ok=True)
            (self.root / "tmp" / n).mkdir(exist_ok=True)
            cmd = ["slurmd", "-D", "-f", str(conf)] + ([] if self.nodes == 1 else ["-N", n])
            self._spawn(f"slurmd-{n}", cmd)
        self._wait_idle()

    def _spawn(self, name: str, cmd: list[str]) -> None:
        # in our process group: a test run killed on its timeout takes the daemons along
        out = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        out.close()

    def _start_munge(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--force", f"--keyfile={key}"], check=True,
                           capture_output=True)
        shutil.chown(m, "munge", "munge")
        m.chmod(0o700)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
        self.munge_socket = m / "munge.socket"
        # munged refuses a socket directory others can write to; ours is 0700, owned by munge
        self._spawn("munged", ["runuser", "-u", "munge", "--", "munged", "-F", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--log-file={m / 'munged.log'}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            enc = subprocess.run(["munge", "-n", f"--socket={self.munge_socket}"],
                                 capture_output=True)
            if enc.returncode == 0:
                return
            if self.procs["munged"].poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"munged did not start: {(m / 'munged.log').read_text()[-800:]}"
                           if (m / "munged.log").exists() else "munged did not start")

    def _write_conf(self) -> Path:
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        r = self.root
        if self.nodes == 1:
            nodeline = (f"NodeName={self.host} NodeAddr=127.0.0.1 Port={node_ports[0]} "
                        f"CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN")
        else:
            nodeline = (f"NodeName=n[1-{self.nodes}] NodeHostname={self.host} NodeAddr=127.0.0.1 "
                        f"Port=[{node_ports[0]}-{node_ports[-1]}] CPUs={CPUS_PER_NODE} "
                        "RealMemory=4000 State=UNKNOWN")
        # job ids unique across test runs: MPICH names its shared-memory segments after the
        # job step (srun's PMI), and a segment left in /dev/shm by a killed rank of an
        # earlier cluster's job 1 would be attached by this one's (seen: MPI_Init failing
        # in UCX's address exchange)
        first_job_id = 1000 + (time.time_ns() // 1000 + os.getpid()) % 60_000_000
        text = f"""\
ClusterName=hpcckpt
FirstJobId={first_job_id}
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldPort={ctld_port}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
TmpFS={r}/tmp/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
InactiveLimit=0
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
SchedulerParameters=defer_batch=0
Waittime=0
{nodeline}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        conf = r / "slurm.conf"
        conf.write_text(text)
        return conf

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}): {self.logs_tail()}")
            r = self.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False)
            if len(set(r.stdout.split())) >= self.nodes:
                return
            time.sleep(0.2)
        raise RuntimeError(f"cluster did not come up in {timeout:g} s: {self.logs_tail()}")

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons we started, by PID (TERM, then KILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user=root"], check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if not self.run(["squeue", "-h"], check=False).stdout.strip():
                    break
                time.sleep(0.2)
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.procs.clear()

    # ---- using it ----------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def sbatch(self, script: str, cwd: Path, *extra: str, env: dict | None = None) -> str:
        """Submit a batch script's text from ``cwd``; returns the job id."""
        path = Path(cwd) / f"job-{time.monotonic_ns()}.sbatch"
        path.write_text(script)
        r = self.run(["sbatch", "--parsable", *extra, str(path)], cwd=cwd,
                     env={**self.env, **(env or {})})
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        r = self.run(["scontrol", "show", "job", "-o", job_id])
        return dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)

    def wait(self, job_id: str, timeout: float = 120, states=FINAL_STATES) -> dict[str, str]:
        """Wait until the job reaches one of ``states``; its record then."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], check=False)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:g} s"
                                     f"\n{self.logs_tail()}")
            time.sleep(0.2)


def start_cluster(nodes: int):
    """Yield a running cluster of ``nodes`` nodes; stop it (and remove its state unless
    HPCCKPT_SLURM_KEEP=1) after."""
    # not under pytest's 0700 tmp tree: munged (user munge) must reach its socket directory
    root = Path(tempfile.mkdtemp(prefix=f"hpcckpt-slurm{nodes}-", dir="/tmp"))
    root.chmod(0o755)
    c = Cluster(root, nodes, log=lambda m: print(f"[slurm fixture] {m}", flush=True))
    try:
        c.start()
    except Unavailable as e:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"SLURM unavailable: {e}")
    except BaseException:
        c.stop()
        raise
    try:
        yield c
    finally:
        c.stop()
        if os.environ.get("HPCCKPT_SLURM_KEEP") != "1":
            shutil.rmtree(root, ignore_errors=True)
