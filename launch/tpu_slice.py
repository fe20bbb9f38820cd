"""A Cloud TPU slice through gcloud: accelerator types checked, created as a queued resource,
recreated after a preemption, the checkout copied and installed, a command run on every worker.

gcloud is the only cloud dependency; `Gcloud(dry_run=True)` prints each command instead of running
it. The queued-resource states are those of https://cloud.google.com/tpu/docs/queued-resources.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import tarfile
import threading
import time

from launch import workers
from launch.workers import Error, SetupFailed, say

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Accelerator families: what the size after the dash counts, the sizes on offer, and the runtime
# (software version) for JAX. v2-v5p sizes count TensorCores (2 per chip, 4 chips per worker VM);
# v5e and v6e sizes count chips (up to 8 on one VM; 4 per VM in multi-host slices).
FAMILIES = {
    'v2': ('cores', (8, 32, 128, 256, 512), 'tpu-ubuntu2204-base'),
    'v3': ('cores', (8, 32, 64, 128, 256, 512, 1024, 2048), 'tpu-ubuntu2204-base'),
    'v4': ('cores', range(8, 4097, 8), 'tpu-ubuntu2204-base'),
    'v5p': ('cores', range(8, 12289, 8), 'v2-alpha-tpuv5'),
    'v5litepod': ('chips', (1, 4, 8, 16, 32, 64, 128, 256), 'v2-alpha-tpuv5-lite'),
    'v6e': ('chips', (1, 4, 8, 16, 32, 64, 128, 256), 'v2-alpha-tpuv6e'),
}
ALIASES = {'v5e': 'v5litepod'}  # the TPU API calls v5e 'v5litepod'
NAME = re.compile(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?')
ZONE = re.compile(r'[a-z]+-[a-z]+[0-9]+-[a-z]')

# On a worker: the checkout in ~/lmjax, a Python 3.11 venv in ~/lmjax-venv (the TPU images ship
# Python 3.10; uv fetches 3.11), the command's pid in ~/lmjax.pid for `stop`.
INSTALL = ('rm -rf ~/lmjax && mkdir ~/lmjax && tar -xzf ~/lmjax.tar.gz -C ~/lmjax && cd ~/lmjax && '
           'python3 -m pip install -q --user uv && '
           'python3 -m uv venv -q --allow-existing --python 3.11 ~/lmjax-venv && '
           'python3 -m uv pip install -q --python ~/lmjax-venv/bin/python -e ".[tpu]"')
RUN = ('cd ~/lmjax && echo $$ > ~/lmjax.pid && '
       'export PATH=$HOME/lmjax-venv/bin:$PATH LMJAX_DISTRIBUTED=auto && exec {command}')
STOP = ('pid=$(cat ~/lmjax.pid 2>/dev/null) && kill -TERM $pid 2>/dev/null && '
        'for i in $(seq 120); do kill -0 $pid 2>/dev/null || break; sleep 1; done; '
        'kill -KILL $pid 2>/dev/null; rm -f ~/lmjax.pid; true')
KEEPALIVE = '--ssh-flag=-o ServerAliveInterval=60'  # notice a vanished worker within minutes


def accelerator_type(value: str) -> str:
  """The TPU API's name for an accelerator type ('v5e-8' -> 'v5litepod-8'), checked."""
  family, _, size = value.partition('-')
  family = ALIASES.get(family, family)
  if family not in FAMILIES or not size.isdigit():
    raise Error(f'--accelerator={value}: expected FAMILY-SIZE with FAMILY one of '
                f'{", ".join(FAMILIES)} (or v5e), e.g. v4-8, v5p-32, v5e-16, v6e-64')
  unit, sizes, _ = FAMILIES[family]
  if int(size) not in sizes:
    shown = f'a multiple of 8 from 8 to {sizes[-1]}' if isinstance(sizes, range) else sizes
    raise Error(f'--accelerator={value}: {family} sizes count {unit}; expected {shown}')
  return f'{family}-{int(size)}'


def workers_of(accelerator: str) -> int:
  """Worker VMs (hosts) of a slice: 4 chips = 8 TensorCores per VM, v5e/v6e up to 8 chips on one."""
  family, size = accelerator.split('-')
  size = int(size)
  if FAMILIES[family][0] == 'cores':
    return max(1, size // 8)
  return 1 if size <= 8 else size // 4


def check_name(flag: str, value: str) -> str:
  if not NAME.fullmatch(value):
    raise Error(f'{flag}={value!r}: expected a TPU name: 1-63 lowercase letters, digits and '
                'hyphens, starting with a letter and not ending with a hyphen')
  return value


def check_zone(value: str) -> str:
  if not ZONE.fullmatch(value or ''):
    raise Error(f'--zone={value!r}: expected a zone such as us-central2-b (region-letter)')
  return value


def gcloud_error(result: subprocess.CompletedProcess) -> str:
  """The line of gcloud's output that says what went wrong."""
  lines = [l.strip() for l in (result.stderr + '\n' + result.stdout).splitlines() if l.strip()]
  return next((l for l in lines if 'ERROR' in l), lines[-1] if lines else 'no output')


def accelerator_of(info: dict) -> str:
  """The accelerator type of a described queued resource ('' if it shows none)."""
  specs = info.get('tpu', {}).get('nodeSpec', [])
  return specs[0].get('node', {}).get('acceleratorType', '') if specs else ''


class Gcloud:
  """Runs gcloud. With dry_run it prints each command instead and answers as if no slice existed
  yet and every slice it creates came up at once."""

  def __init__(self, project: str = '', dry_run: bool = False):
    self.project, self.dry_run, self._created = project, dry_run, set()

  def argv(self, *args: str) -> list[str]:
    return ['gcloud', *args] + ([f'--project={self.project}'] if self.project else [])

  def __call__(self, *args: str) -> subprocess.CompletedProcess:
    argv = self.argv(*args)
    if not self.dry_run:
      return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    print(shlex.join(argv))
    out, code = '', 0
    if args[:4] == ('compute', 'tpus', 'queued-resources', 'create'):
      self._created.add(args[4])
    elif args[:4] == ('compute', 'tpus', 'queued-resources', 'describe'):
      code = 0 if args[4] in self._created else 1
      out = json.dumps(dict(state=dict(state='ACTIVE'))) if code == 0 else ''
    elif args[:2] == ('storage', 'cat'):
      code = 1
    return subprocess.CompletedProcess(argv, code, out, 'NOT_FOUND' if code else '')


_PACK_LOCK = threading.Lock()


def pack(path: str, dry_run: bool) -> str:
  """This checkout (tracked files, and untracked ones git does not ignore) as a .tar.gz at `path`,
  packed once: the slices of a pool share it (their threads wait for the first)."""
  with _PACK_LOCK:
    return _pack_once(path, dry_run)


@functools.cache
def _pack_once(path: str, dry_run: bool) -> str:
  if dry_run:
    print(f'# pack this checkout (git ls-files: tracked and untracked, not ignored) into {path}')
    return path
  listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                          cwd=ROOT, capture_output=True)
  if listed.returncode:
    raise Error(f'packing {ROOT} needs git: {listed.stderr.decode().strip()}')
  listed = listed.stdout.decode()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path + '.tmp', 'w:gz', compresslevel=1) as tar:
    for name in sorted(set(filter(None, listed.split('\0')))):
      if os.path.isfile(os.path.join(ROOT, name)):
        tar.add(os.path.join(ROOT, name), arcname=name)
  os.replace(path + '.tmp', path)
  return path


class Slice:
  """A Cloud TPU slice as a queued resource of the same name (its one node has that name too).

  `up()` makes it ACTIVE: creates it, or deletes and recreates it after a preemption, waiting for
  capacity in between; then copies and installs the checkout once per incarnation (or, before a
  rerun on the same slice, stops what is left of the last run). `start()` runs a command on every
  worker, one `gcloud ... ssh --worker=i` each, so that each worker has its own log and exit code.
  """

  def __init__(self, name: str, zone: str, accelerator: str, runtime: str, tier: str,
               gcloud: Gcloud, log_dir: str, tarball: str, poll: float, echo: bool = True):
    self.name, self.zone, self.accelerator, self.tier = name, zone, accelerator, tier
    self.tarball = tarball
    self.runtime = runtime or (FAMILIES[accelerator.split('-')[0]][2] if accelerator else '')
    self.gcloud, self.log_dir, self.poll, self.echo = gcloud, log_dir, poll, echo
    self.workers = workers_of(accelerator) if accelerator else 0
    self._installed = self._dirty = self._replace = False

  def _qr(self, verb: str, *flags: str) -> subprocess.CompletedProcess:
    return self.gcloud('compute', 'tpus', 'queued-resources', verb, self.name, f'--zone={self.zone}',
                       *flags)

  def _vm(self, verb: str, *flags: str) -> list[str]:
    return ['compute', 'tpus', 'tpu-vm', verb, self.name, f'--zone={self.zone}', *flags]

  def describe(self) -> dict:
    """The queued resource as gcloud's JSON shows it (its REST resource), or
    {'state': {'state': 'NOT_FOUND'}}."""
    r = self._qr('describe', '--format=json')
    if r.returncode:
      if 'NOT_FOUND' in r.stderr:
        return dict(state=dict(state='NOT_FOUND'))
      raise Error(f'{self.name}: describing the queued resource failed: {gcloud_error(r)}')
    return json.loads(r.stdout)

  def node_state(self) -> str:
    r = self.gcloud(*self._vm('describe', '--format=value(state)'))
    return r.stdout.strip() if not r.returncode else 'NOT_FOUND'

  def create(self) -> None:
    tier = {'spot': ['--spot'], 'reserved': ['--reserved'], 'on-demand': []}[self.tier]
    r = self._qr('create', f'--node-id={self.name}', f'--accelerator-type={self.accelerator}',
                 f'--runtime-version={self.runtime}', *tier)
    what = f'{self.name}: creating a {self.tier} {self.accelerator} in {self.zone}'
    if r.returncode and re.search(r'quota|RESOURCE_EXHAUSTED', r.stderr, re.IGNORECASE):
      raise Error(f'{what} failed for lack of quota ({gcloud_error(r)}); ask for TPU quota in '
                  'the console (IAM & Admin > Quotas) or pick another zone or accelerator')
    if r.returncode and 'ALREADY_EXISTS' not in r.stderr:
      raise Error(f'{what} failed: {gcloud_error(r)}')
    self._installed = False

  def delete(self) -> None:
    r = self._qr('delete', '--force', '--quiet')
    if r.returncode and 'NOT_FOUND' not in r.stderr:
      raise Error(f'{self.name}: deleting the queued resource failed: {gcloud_error(r)}')

  def ensure_active(self) -> None:
    """Creates, recreates or waits until the queued resource is ACTIVE."""
    seen = ''
    while True:
      info = self.describe()
      state, found = info['state']['state'], accelerator_of(info)
      if found and found != self.accelerator:
        raise Error(f'{self.name}: the slice exists as {found}, not {self.accelerator}: pass '
                    f'--accelerator={found} or delete it')
      if state != seen:
        say(f'{self.name}: queued resource {state}' +
            (' (waiting for capacity)' if state == 'WAITING_FOR_RESOURCES' else ''))
        seen = state
      if state == 'ACTIVE' and not self._replace:
        break
      if state == 'NOT_FOUND':
        self.create()
      elif state == 'FAILED':
        raise Error(f'{self.name}: the queued resource FAILED; `gcloud compute tpus queued-resources '
                    f'describe {self.name} --zone={self.zone}` says why; delete it with '
                    f'`python -m launch.tpu delete {self.name} --zone={self.zone}`')
      elif state in ('SUSPENDED', 'ACTIVE'):  # preempted (or ACTIVE with a lost VM): start afresh
        say(f'{self.name}: deleting the {"preempted" if state == "ACTIVE" else state} slice to '
            'create it again')
        self.delete()
        self._replace = False
      else:  # CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, DELETING
        time.sleep(self.poll)

  def _setup_step(self, what: str, args: list[str]) -> None:
    r = self.gcloud(*args)
    if not self.gcloud.dry_run:
      os.makedirs(self.log_dir, exist_ok=True)
      with open(os.path.join(self.log_dir, 'setup.log'), 'a') as f:
        f.write(f'==> {shlex.join(self.gcloud.argv(*args))}\n{r.stdout}{r.stderr}')
    if r.returncode:
      raise SetupFailed(f'{self.name}: {what} failed (gcloud exit {r.returncode}: '
                        f'{gcloud_error(r)}; all of it in {self.log_dir}/setup.log)')

  def up(self) -> None:
    self.ensure_active()
    if not self._installed:
      tarball = pack(self.tarball, self.gcloud.dry_run)
      say(f'{self.name}: copying this checkout to {self.workers} worker(s) and installing it')
      self._setup_step('copying the checkout', [
          'compute', 'tpus', 'tpu-vm', 'scp', tarball, f'{self.name}:lmjax.tar.gz',
          f'--zone={self.zone}', '--worker=all'])
      self._setup_step('installing', self._vm('ssh', '--worker=all', f'--command={INSTALL}'))
      self._installed = True
    elif self._dirty:  # a failed run may have left processes behind (they hold the TPU)
      self.stop()
    self._dirty = False

  def stop(self) -> subprocess.CompletedProcess:
    """SIGTERM to the command on every worker (it checkpoints), SIGKILL if alive after 2 min."""
    return self.gcloud(*self._vm('ssh', '--worker=all', f'--command={STOP}'))

  def start(self, argv: list[str], header: str, log_dir: str = '') -> workers.Group:
    command = RUN.format(command=shlex.join(argv))
    procs = [workers.Proc(self.gcloud.argv(*self._vm('ssh', f'--worker={i}', KEEPALIVE,
                                                     f'--command={command}')), worker=i)
             for i in range(self.workers)]
    return workers.Group(procs, log_dir or self.log_dir, header, self.echo, self.gcloud.dry_run)

  def lost(self) -> str:
    """After a failed run: why the slice cannot take a rerun ('' if it can)."""
    self._dirty = True
    state = self.describe()['state']['state']
    if state != 'ACTIVE':
      return f'the queued resource is {state}' + (' (preempted)' if 'SUSPEND' in state else '')
    node = self.node_state()
    if node != 'READY':
      self._replace = True
      return f'the TPU VM is {node}'
    return ''
