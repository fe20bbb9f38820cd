"""A scaling sweep on a pool of slices: one run per slice at a time, from a resumable queue file.

The queue, <workdir>/launch_queue.json, lists every run of the sweep (lmjax.scaling.sweep's grid) with
its command, the runs it starts from (`after`: a CPT run starts from its size's pretraining run) and
its state: pending, running, done or failed. It is rewritten after every change, atomically (a
temporary file renamed; on gs:// one `gcloud storage cp`, and an object appears whole), so running the
same sweep command again continues where it stopped: done runs are skipped, the others start again
(lmjax.train resumes them from their checkpoints), failed ones with fresh attempts. A run that fails
goes back to the queue for the next free slice, at most `max_restarts` times; a slice that was
preempted is recreated before its next run (launch/tpu_slice.py Slice.up).
"""
from __future__ import annotations

import json
import os
import shlex
import tempfile
import threading
import time

from launch.tpu_slice import gcloud_error
from launch.workers import Error, SetupFailed, say

QUEUE_FILE = 'launch_queue.json'


def queue_path(workdir: str) -> str:
  return workdir.rstrip('/') + '/' + QUEUE_FILE


def sweep_jobs(config_arg: str, workdir: str) -> list[dict]:
  """The runs of a sweep config (`configs/x.py[:knobs]`): name, command and the runs it starts from."""
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from lmjax.scaling import sweep  # pylint: disable=import-outside-toplevel
  file, _, knobs = config_arg.partition(':')
  specs = sweep.expand(config_lib.load(file, knobs or None), workdir)
  commands = sweep.commands(specs, file, knobs, workdir)
  by_dir = {sweep.run_dir(workdir, s.name): s.name for s in specs}
  return [dict(name=s.name, command=command,
               after=[by_dir[s.config.init_from]] if s.config.init_from in by_dir else [])
          for s, command in zip(specs, commands)]


def read_json(path: str, gcloud) -> object | None:
  """The JSON at a local path or gs:// URL; None if there is none."""
  if path.startswith('gs://'):
    r = gcloud('storage', 'cat', path)
    if r.returncode:
      if 'NOT_FOUND' in r.stderr or 'matched no objects' in r.stderr:
        return None
      raise Error(f'reading {path} failed: {gcloud_error(r)}')
    return json.loads(r.stdout)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj, gcloud) -> None:
  """Writes atomically: readers see the old or the new file, never part of one."""
  text = json.dumps(obj, indent=1)
  if path.startswith('gs://'):
    with tempfile.NamedTemporaryFile('w', suffix='.json') as f:
      f.write(text)
      f.flush()
      r = gcloud('storage', 'cp', f.name, path)
    if r.returncode:
      raise Error(f'writing {path} failed: {gcloud_error(r)}')
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


class Queue:
  """The sweep's runs and their states, saved after every change (not in a dry run)."""

  def __init__(self, path: str, jobs: list[dict], gcloud):
    self.path, self.gcloud = path, gcloud
    old = {j['name']: j for j in (read_json(path, gcloud) or {}).get('runs', [])}
    self.jobs = []
    for job in jobs:
      prev = old.get(job['name'], {})
      same = prev.get('command') == job['command']
      state = 'done' if same and prev.get('state') == 'done' else 'pending'
      attempts = prev.get('attempts', 0) if same and prev.get('state') == 'running' else 0
      self.jobs.append(dict(job, state=state, attempts=attempts, slice='', error=''))
    done = sum(j['state'] == 'done' for j in self.jobs)
    if gcloud.dry_run:
      print(f'# queue {path}: {len(self.jobs)} runs ({done} done), rewritten after every change')
    else:
      say(f'queue {path}: {len(self.jobs)} runs, {done} done')
      self.save()

  def save(self) -> None:
    if not self.gcloud.dry_run:
      write_json(self.path, dict(runs=self.jobs), self.gcloud)

  def set(self, job: dict, **fields) -> None:
    job.update(fields)
    self.save()

  def next_ready(self) -> dict | None:
    """The first pending run whose `after` runs are done."""
    done = {j['name'] for j in self.jobs if j['state'] == 'done'}
    return next((j for j in self.jobs if j['state'] == 'pending' and set(j['after']) <= done), None)

  def count(self, state: str) -> int:
    return sum(j['state'] == state for j in self.jobs)


class Slot:
  """A slice of the pool and the run it serves, in a thread of its own (inline in a dry run)."""

  def __init__(self, tpu_slice, runs_dir: str, poll: float, grace: float):
    self.slice, self.runs_dir, self.poll, self.grace = tpu_slice, runs_dir, poll, grace
    self.job = self.result = self.group = None
    self.dead = ''  # why this slice takes no more runs

  def launch(self, job: dict) -> None:
    self.job, self.result = job, None
    if self.slice.gcloud.dry_run:
      self._serve(job)
    else:
      threading.Thread(target=self._serve, args=(job,), daemon=True).start()

  def _serve(self, job: dict) -> None:
    try:
      self.slice.up()
      self.group = self.slice.start(shlex.split(job['command']), f'{job["name"]} on {self.slice.name}',
                                    os.path.join(self.runs_dir, job['name']))
      code, why = self.group.wait(self.poll, self.grace)
      lost = self.slice.lost() if code else ''
      result = (code, f'{why}; {lost}' if lost else why)
    except SetupFailed as e:
      result = (1, str(e))
    except Exception as e:  # pylint: disable=broad-except
      # Error (no quota, a FAILED queued resource), or a bug: either way the pool must not hang
      self.dead = str(e) if isinstance(e, Error) else f'{type(e).__name__}: {e}'
      result = (None, self.dead)
    self.group = None
    self.result = result


def run(slices: list, queue: Queue, runs_dir: str, max_restarts: int, poll: float,
        grace: float) -> None:
  """Serves the queue with the slices until no run is pending or running (each run's logs in
  <runs_dir>/<run>/); raises Error naming the runs that failed (others may wait on them)."""
  slots = [Slot(s, runs_dir, poll, grace) for s in slices]
  try:
    while True:
      for slot in slots:
        if slot.job is not None and slot.result is not None:
          _settle(slot, queue, max_restarts)
      for slot in slots:
        if slot.job is None and not slot.dead and (job := queue.next_ready()):
          queue.set(job, state='running', slice=slot.slice.name)
          say(f'{job["name"]}: starting on {slot.slice.name} ({queue.count("done")}/'
              f'{len(queue.jobs)} done)')
          slot.launch(job)
      if all(slot.job is None for slot in slots):
        break
      time.sleep(min(poll, 1.0))
  except KeyboardInterrupt:
    say('interrupted; stopping the runs (they checkpoint first)')
    for slot in slots:
      if slot.group:
        slot.slice.stop()
        slot.group.stop(grace)
    raise
  dead = [s for s in slots if s.dead]
  left = [j['name'] for j in queue.jobs if j['state'] != 'done']
  if len(dead) == len(slots) and left:
    raise Error(f'no slice of the pool can take runs ({dead[0].dead}); {len(left)} runs left')
  if left:
    failed = [j['name'] for j in queue.jobs if j['state'] == 'failed']
    raise Error(f'{len(left)} of {len(queue.jobs)} runs did not finish (failed: {failed}; the '
                'others wait on them); running the same command again retries them')


def _settle(slot: Slot, queue: Queue, max_restarts: int) -> None:
  (code, why), job, name = slot.result, slot.job, slot.slice.name
  slot.job = slot.result = None
  if code == 0:
    queue.set(job, state='done', error='')
    say(f'{job["name"]}: done on {name}')
  elif code is None:
    queue.set(job, state='pending')
    say(f'{name}: {why}; it takes no more runs')
  elif job['attempts'] < max_restarts:
    queue.set(job, state='pending', attempts=job['attempts'] + 1, error=why)
    say(f'{job["name"]}: {why} on {name}; retry {job["attempts"]}/{max_restarts}')
  else:
    queue.set(job, state='failed', error=why)
    say(f'{job["name"]}: {why} on {name}; failed after {max_restarts} retries')
