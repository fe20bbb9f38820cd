"""One multi-host command as a group of worker processes, restarted after failures.

A backend brings its machines `up()`, `start()`s the command on every worker, after a failure says
whether its machines were `lost()` (a preempted slice, which its next `up()` recreates), and on an
interrupt (Ctrl-C, SIGTERM) `stop()`s what runs on remote machines.
`supervise` runs the command until every worker exits 0, restarting it at most `max_restarts` times;
the command resumes from the last checkpoint in its workdir (lmjax.train does that by itself).
Backends here: `Local` (N processes on this machine, a multi-host run in miniature) and `Slurm`
(srun inside an allocation); the Cloud TPU one is launch/tpu_slice.py Slice.

Every worker's output goes to <log_dir>/worker-<i>.log (appended, a header per attempt); worker 0's is
also echoed to stdout as it arrives. When one worker fails the others are stopped at once (SIGTERM,
then SIGKILL after `grace` seconds): in a multi-host run they would otherwise hang in a collective.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


class Error(Exception):
  """A failure that a restart cannot fix (bad flags, no quota, a queued resource that FAILED)."""


class SetupFailed(Exception):
  """Bringing the machines up failed in a way a retry may fix (e.g. one worker failed to install)."""


def say(message: str) -> None:
  """The launcher's own lines: on stderr, apart from worker 0's output on stdout."""
  print(f'[launch {time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


@dataclasses.dataclass
class Proc:
  """One process of an attempt. `worker`: the worker whose output it prints; None for srun --label,
  whose output lines start with 'N: ' naming the worker. `env` is added to this process's env."""
  argv: list[str]
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  worker: int | None = 0

  @property
  def name(self) -> str:
    return 'srun' if self.worker is None else f'worker {self.worker}'


_LABEL = re.compile(rb'^\s*(\d+): ?')


class Group:
  """The processes of one attempt, each in its own session (so that a stop reaches its children),
  their output teed into per-worker logs. With dry_run the commands are printed, not run."""

  def __init__(self, procs: list[Proc], log_dir: str, header: str, echo: bool = True,
               dry_run: bool = False):
    self.procs, self.log_dir, self.header, self.echo = procs, log_dir, header, echo
    self.popens, self._threads, self._logs, self._lock = [], [], {}, threading.Lock()
    if dry_run:
      for p in procs:
        print(shlex.join([f'{k}={v}' for k, v in p.env.items()] + p.argv))
      return
    os.makedirs(log_dir, exist_ok=True)
    for p in procs:
      popen = subprocess.Popen(p.argv, env={**os.environ, **p.env}, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
      self.popens.append(popen)
      self._threads.append(threading.Thread(target=self._tee, args=(popen.stdout, p.worker),
                                            daemon=True))
      self._threads[-1].start()

  def _log(self, worker: int | str):
    with self._lock:
      if worker not in self._logs:
        name = f'worker-{worker}.log' if isinstance(worker, int) else f'{worker}.log'
        self._logs[worker] = open(os.path.join(self.log_dir, name), 'ab')
        self._logs[worker].write(f'==> {self.header}\n'.encode())
      return self._logs[worker]

  def _write(self, worker: int | str, data: bytes) -> None:
    log = self._log(worker)
    log.write(data)
    log.flush()
    if self.echo and worker in (0, 'srun'):
      sys.stdout.buffer.write(data)
      sys.stdout.flush()

  def _tee(self, stream, worker: int | None) -> None:
    if worker is not None:  # chunks, not lines: progress bars redraw with '\r'
      while chunk := stream.read1(1 << 16):
        self._write(worker, chunk)
      return
    for line in stream:
      label = _LABEL.match(line)
      if label:
        self._write(int(label.group(1)), line[label.end():])
      else:
        self._write('srun', line)

  def wait(self, poll: float, grace: float) -> tuple[int, str]:
    """(0, '') once every process exited 0; else, as soon as one fails, stops the others and returns
    (an exit code, which ones failed: a dead worker's peers often fail within the same poll)."""
    while True:
      codes = [p.poll() for p in self.popens]
      failed = [i for i, code in enumerate(codes) if code]
      if failed:
        self.stop(grace)
        return codes[failed[0]], ', '.join(f'{self.procs[i].name} exited with code {codes[i]}'
                                           for i in failed)
      if all(code == 0 for code in codes):
        self._close()
        return 0, ''
      time.sleep(min(poll, 1.0))  # processes are cheap to check

  def stop(self, grace: float) -> None:
    """SIGTERM to every process group (a trainer checkpoints on it), SIGKILL after `grace` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
      for p in self.popens:
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:
          pass
      deadline = time.monotonic() + grace
      for p in self.popens:
        try:
          p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          pass
      if all(p.poll() is not None for p in self.popens):
        break
    self._close()

  def _close(self) -> None:
    for t in self._threads:
      t.join(timeout=5)
    for log in self._logs.values():
      log.close()


def supervise(backend, argv: list[str], max_restarts: int, poll: float, grace: float) -> None:
  """Runs `argv` on the backend's workers until every one exits 0; after a failure brings the
  machines up again (recreating lost ones) and reruns it, at most `max_restarts` times."""
  for attempt in range(max_restarts + 1):
    try:
      backend.up()
      group = backend.start(argv, f'attempt {attempt + 1}')
      try:
        code, why = group.wait(poll, grace)
      except KeyboardInterrupt:
        say(f'{backend.name}: interrupted; stopping the workers (they checkpoint first)')
        backend.stop()
        group.stop(grace)
        raise
      if not code:
        return
      lost = backend.lost()
      why = f'{why}; {lost}' if lost else why
    except SetupFailed as e:
      why = str(e)
    if attempt < max_restarts:
      say(f'{backend.name}: {why}; restart {attempt + 1}/{max_restarts}: rerunning the command '
          '(it resumes from its last checkpoint)')
  raise Error(f'{backend.name}: {why}; no restarts left (--max_restarts={max_restarts})')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _Present:
  """Machines that are simply there: nothing to bring up, to lose, or to stop remotely."""

  def up(self) -> None:
    pass

  def lost(self) -> str:
    return ''

  def stop(self) -> None:
    pass


class Local(_Present):
  """N processes on this machine, wired as the hosts of one run: LMJAX_COORDINATOR,
  LMJAX_NUM_PROCESSES and LMJAX_PROCESS_ID (read by lmjax.distributed.initialize). Each process
  owns `devices_per_process` devices: on CPU it fakes that many; on a GPU machine process i sees
  GPUs [i * d, (i + 1) * d) of CUDA_VISIBLE_DEVICES (or of all GPUs) and NCCL joins them, so one
  process per GPU is `--processes=8 --devices_per_process=1` (one process for all needs no launcher)."""
  name = 'local'

  def __init__(self, processes: int, devices_per_process: int, log_dir: str, dry_run: bool = False):
    if processes < 1:
      raise Error(f'--processes={processes}: expected at least 1')
    if devices_per_process < 1:
      raise Error(f'--devices_per_process={devices_per_process}: expected at least 1')
    self.processes, self.devices, self.log_dir = processes, devices_per_process, log_dir
    self.dry_run = dry_run

  def start(self, argv: list[str], header: str) -> Group:
    coordinator = '127.0.0.1:' + ('PORT' if self.dry_run else str(free_port()))
    visible = os.environ.get('CUDA_VISIBLE_DEVICES', '')
    gpus = visible.split(',') if visible else [str(g) for g in range(self.processes * self.devices)]
    if len(gpus) < self.processes * self.devices:
      raise Error(f'--processes={self.processes} x --devices_per_process={self.devices} GPUs, but '
                  f'CUDA_VISIBLE_DEVICES={visible!r} names {len(gpus)}')
    procs = []
    for i in range(self.processes):
      env = dict(LMJAX_COORDINATOR=coordinator, LMJAX_NUM_PROCESSES=str(self.processes),
                 LMJAX_PROCESS_ID=str(i))
      if self.devices > 1:
        env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={self.devices}'
      env['CUDA_VISIBLE_DEVICES'] = ','.join(gpus[i * self.devices:(i + 1) * self.devices])
      procs.append(Proc(argv, env, i))
    return Group(procs, self.log_dir, header, dry_run=self.dry_run)


class Slurm(_Present):
  """Inside a SLURM allocation (salloc, or a script under sbatch): one srun task per GPU, each
  seeing all of its node's GPUs; LMJAX_DISTRIBUTED=auto lets JAX read SLURM's variables (coordinator
  from the node list, process id from SLURM_PROCID, local device from SLURM_LOCALID).
  --kill-on-bad-exit ends every task when one fails; --label tags each line with its task."""
  name = 'slurm'

  def __init__(self, tasks_per_node: int, log_dir: str, dry_run: bool = False):
    if tasks_per_node < 1:
      raise Error(f'--tasks_per_node={tasks_per_node}: expected at least 1 (one task per GPU)')
    self.tasks_per_node, self.log_dir, self.dry_run = tasks_per_node, log_dir, dry_run

  def start(self, argv: list[str], header: str) -> Group:
    srun = ['srun', f'--ntasks-per-node={self.tasks_per_node}', '--kill-on-bad-exit=1', '--label']
    return Group([Proc(srun + argv, dict(LMJAX_DISTRIBUTED='auto'), None)], self.log_dir, header,
                 dry_run=self.dry_run)
