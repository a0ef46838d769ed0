"""A throw-away single-node Slurm (munged, slurmctld, slurmd) under a temporary directory, for tests.

Everything it starts runs in the foreground as its child, with its own config, state, ports and munge
key; `stop()` ends the jobs, then each daemon and any process left from a job step, by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "scontrol", "squeue", "sinfo")
NODE = "localhost"  # The node's name is also the address of jax's coordinator (SLURM_STEP_NODELIST).


def missing_programs() -> list[str]:
  """The Slurm and munge programs not on PATH (or in /usr/sbin)."""
  path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
  return [p for p in PROGRAMS if shutil.which(p, path=path) is None]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _slurm_conf(root: str, *, cpus: int) -> str:
  return f"""\
ClusterName=local
SlurmctldHost={NODE}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued: a task signalled while it
# compiles (a minute or more on a busy two-core machine) must still reach its next step and save.
KillWait=600
MinJobAge=3600
SlurmdTimeout=300
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=local Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
  """A single-node Slurm cluster on this machine; use as a context manager."""

  def __init__(self, root: str, *, cpus: int = 2):
    self.root = os.path.abspath(root)
    self.cpus = cpus
    self.conf = os.path.join(self.root, "slurm.conf")
    self.env = dict(os.environ, SLURM_CONF=self.conf)
    self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), "/usr/sbin", "/sbin"])
    self._daemons: list[subprocess.Popen] = []

  def __enter__(self) -> "LocalSlurm":
    try:
      self.start()
    except BaseException:
      self.stop()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  def start(self, timeout: float = 60.0) -> None:
    for d in ("munge", "state", "spool", "log"):
      os.makedirs(os.path.join(self.root, d), mode=0o700, exist_ok=True)
    os.chmod(self.root, 0o755)  # munged refuses a socket directory that others can write to.
    key = os.path.join(self.root, "munge", "munge.key")
    with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o400), "wb") as f:
      f.write(os.urandom(1024))
    with open(self.conf, "w") as f:
      f.write(_slurm_conf(self.root, cpus=self.cpus))
    with open(os.path.join(self.root, "cgroup.conf"), "w") as f:
      f.write("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
    munge = os.path.join(self.root, "munge")
    self._spawn(["munged", "--foreground", "--force", f"--key-file={key}",
                 f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
                 f"--log-file={self.root}/log/munged.log", f"--seed-file={munge}/munged.seed"], "munged")
    self._wait(lambda: os.path.exists(f"{munge}/munge.socket"), timeout, "munged's socket")
    self._spawn(["slurmctld", "-D", "-c", "-f", self.conf], "slurmctld")
    self._wait(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0, timeout,
               "slurmctld to answer")
    self._spawn(["slurmd", "-D", "-N", NODE, "-f", self.conf], "slurmd")
    self._wait(lambda: self._node_state().startswith("IDLE"), timeout, f"node {NODE} to be idle")

  def _spawn(self, argv: list[str], name: str) -> None:
    log = open(os.path.join(self.root, "log", f"{name}.out"), "w")  # pylint: disable=consider-using-with
    self._daemons.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
    log.close()

  def _wait(self, ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
      dead = [p.args[0] for p in self._daemons if p.poll() is not None]
      if dead or time.monotonic() > deadline:
        raise RuntimeError(f"Local Slurm: gave up waiting for {what}"
                           f"{' (' + ', '.join(dead) + ' exited)' if dead else ''}.\n{self.logs()}")
      time.sleep(0.2)

  def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=check, timeout=60)

  def _node_state(self) -> str:
    out = self._run(["sinfo", "-h", "-n", NODE, "-o", "%T"], check=False).stdout
    return out.strip().upper()

  def logs(self, tail: int = 3000) -> str:
    """The end of every daemon's log, for error messages."""
    parts = []
    for name in sorted(os.listdir(os.path.join(self.root, "log"))):
      with open(os.path.join(self.root, "log", name), errors="replace") as f:
        parts.append(f"--- {name}\n{f.read()[-tail:]}")
    return "\n".join(parts)

  def sbatch(self, args: list[str], *, cwd: str, env: dict[str, str] | None = None) -> int:
    """Submits a batch job; returns its id."""
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                         capture_output=True, text=True, check=False, timeout=60)
    if out.returncode:
      raise RuntimeError(f"sbatch {' '.join(args)} failed: {out.stderr}")
    return int(out.stdout.strip().split(";")[0])

  def scontrol(self, *args: str) -> str:
    return self._run(["scontrol", *args]).stdout

  def scancel(self, *args: str) -> None:
    self._run(["scancel", *args])

  def job(self, job_id: int) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
    fields = {}
    for token in self.scontrol("show", "job", "-o", str(job_id)).split():
      key, _, value = token.partition("=")
      fields.setdefault(key, value)
    return fields

  def wait_for(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict[str, str]:
    """Polls the job until its state is one of states; returns its fields."""
    deadline = time.monotonic() + timeout
    while True:
      fields = self.job(job_id)
      if fields.get("JobState") in states:
        return fields
      if time.monotonic() > deadline:
        raise TimeoutError(f"Job {job_id} is {fields.get('JobState')} after {timeout:.0f} s, "
                           f"not one of {states}.")
      time.sleep(0.5)

  def stop(self) -> None:
    """Cancels every job, then ends the daemons and leftover job processes, each by its pid."""
    if self._daemons and all(p.poll() is None for p in self._daemons):
      try:
        self._run(["scancel", "--full", "--signal=KILL", "--partition=local"], check=False)
        deadline = time.monotonic() + 30
        while (self._run(["squeue", "-h", "-t", "RUNNING,COMPLETING"], check=False).stdout.strip()
               and time.monotonic() < deadline):
          time.sleep(0.5)
      except (OSError, subprocess.SubprocessError):
        pass
    for p in reversed(self._daemons):  # slurmd, slurmctld, then munged.
      if p.poll() is None:
        p.terminate()
        try:
          p.wait(timeout=15)
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait()
    self._daemons = []
    for pid in self._leftover_pids():
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass

  def _leftover_pids(self) -> list[int]:
    """Processes (slurmstepd, job tasks) whose environment names this cluster's config."""
    marker = f"SLURM_CONF={self.conf}\0".encode()
    pids = []
    for entry in os.listdir("/proc"):
      if not entry.isdigit() or int(entry) == os.getpid():
        continue
      try:
        with open(f"/proc/{entry}/environ", "rb") as f:
          if marker in f.read() + b"\0":
            pids.append(int(entry))
      except OSError:
        continue
    return pids
