"""Runs lmjax on Cloud TPU VMs: creates a slice, runs a command on every worker, survives preemption.

  python -m launch.tpu create lmjax-1b --zone=us-east5-a --accelerator=v5p-32 --spot
  python -m launch.tpu run lmjax-1b --zone=us-east5-a --accelerator=v5p-32 --spot -- \
      python -m lmjax.train --config=configs/pretrain.py:size=1b --workdir=gs://BUCKET/lmjax/1b
  python -m launch.tpu status lmjax-1b --zone=us-east5-a    # also: logs, stop, delete
  python -m launch.tpu sweep dcpt --slices=4 --zone=us-west4-a --accelerator=v5e-8 --spot \
      --config=configs/dcpt_sweep.py:runlocal=False --workdir=gs://BUCKET/lmjax/dcpt
  python -m launch.tpu run --backend=local --processes=2 -- python -m lmjax.train ...
  python -m launch.tpu run --backend=slurm --tasks_per_node=8 -- python -m lmjax.train ...

`run` creates the slice if it does not exist (a queued resource: it waits for capacity), copies this
checkout to every worker, installs it with the [tpu] extra, and starts the command on all workers with
LMJAX_DISTRIBUTED=auto (lmjax.distributed). Worker 0's output streams here; every worker's goes to
<log_dir>/<name>/worker-<i>.log. If a worker dies or the slice is preempted, the slice is recreated
when it is gone and the same command runs again: lmjax.train resumes from the last checkpoint in the
gs:// workdir. --dry-run prints every command instead. gcloud is the only cloud dependency.
docs/launch.md goes from zero to a 1b run and a sweep.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from launch import pool, workers
from launch.tpu_slice import (Error, Gcloud, Slice, accelerator_of, accelerator_type, check_name,
                              check_zone, gcloud_error)
from launch.workers import say


def workdir_of(argv: list[str]) -> str:
  return next((a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')), '')


def check_shared(flag: str, workdir: str) -> None:
  if workdir and not workdir.startswith('gs://'):
    raise Error(f'{flag}={workdir}: every worker and every restart must see the same checkpoints: '
                'expected gs://BUCKET/PATH')


def make_slice(args, name: str, gcloud: Gcloud, log_dir: str = '', echo: bool = True) -> Slice:
  """The slice that the flags describe, checked before anything is created (status, stop and delete
  take no accelerator flags). Logs in `log_dir`, default <log_dir>/<name>; the packed checkout in
  its parent."""
  accelerator = tier = ''
  if hasattr(args, 'accelerator'):
    accelerator = accelerator_type(args.accelerator)
    tier = 'spot' if args.spot else 'reserved' if args.reserved else 'on-demand'
  log_dir = log_dir or os.path.join(args.log_dir, name)
  return Slice(check_name('NAME', name), check_zone(args.zone), accelerator,
               getattr(args, 'runtime', ''), tier, gcloud, log_dir,
               os.path.join(os.path.dirname(log_dir), 'lmjax.tar.gz'), args.poll, echo)


def cmd_create(args, gcloud):
  make_slice(args, args.name, gcloud).ensure_active()


def cmd_run(args, gcloud):
  command = args.command
  if not command:
    raise Error('give the command to run after --')
  if args.max_restarts < 0:
    raise Error(f'--max_restarts={args.max_restarts}: expected 0 or more')
  if args.backend == 'local':
    backend = workers.Local(args.processes, args.devices_per_process,
                            os.path.join(args.log_dir, args.name or 'local'), args.dry_run)
  elif args.backend == 'slurm':
    backend = workers.Slurm(args.tasks_per_node, os.path.join(args.log_dir, args.name or 'slurm'),
                            args.dry_run)
  else:
    backend = make_slice(args, args.name or '', gcloud)
    check_shared('--workdir', workdir_of(command))
    if args.dry_run:
      print(f'# {backend.accelerator}: {backend.workers} worker(s), runtime {backend.runtime}, '
            f'{backend.tier}; on a failure the slice is checked and, if preempted, recreated; '
            f'up to {args.max_restarts} restarts')
  workers.supervise(backend, command, args.max_restarts, args.poll, args.grace)


def cmd_status(args, gcloud):
  s = make_slice(args, args.name, gcloud)
  info = s.describe()
  state, accelerator = info['state']['state'], accelerator_of(info)
  node = s.node_state() if state != 'NOT_FOUND' else 'NOT_FOUND'
  print(f'{s.name} ({s.zone}): queued resource {state}, TPU VM {node}' +
        (f', {accelerator}' if accelerator else ''))
  if os.path.isdir(s.log_dir):
    print(f'logs: {s.log_dir}/ ({", ".join(sorted(os.listdir(s.log_dir)))})')


def cmd_logs(args, gcloud):
  del gcloud
  log_dir = os.path.join(args.log_dir, check_name('NAME', args.name))
  if args.run:
    log_dir = os.path.join(log_dir, 'runs', args.run)
  path = os.path.join(log_dir, f'worker-{args.worker}.log')
  if not os.path.isfile(path):
    found = sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []
    raise Error(f'no log {path}; {log_dir} has {found or "nothing"}')
  with open(path, errors='replace') as f:
    sys.stdout.write(''.join(f.readlines()[-args.lines:]))


def cmd_stop(args, gcloud):
  r = make_slice(args, args.name, gcloud).stop()
  if r.returncode:
    raise Error(f'{args.name}: stopping the command failed: {gcloud_error(r)}')


def cmd_delete(args, gcloud):
  make_slice(args, args.name, gcloud).delete()


def cmd_sweep(args, gcloud):
  if args.slices < 1:
    raise Error(f'--slices={args.slices}: expected at least 1')
  check_shared('--workdir', args.workdir)
  root = os.path.join(args.log_dir, args.name)
  slices = [make_slice(args, f'{args.name}-{i}', gcloud, os.path.join(root, f'{args.name}-{i}'),
                       echo=False) for i in range(args.slices)]
  if args.dry_run:
    s = slices[0]
    print(f'# pool of {args.slices} {s.accelerator} ({s.workers} worker(s) each, runtime '
          f'{s.runtime}, {s.tier}); a run that fails is retried up to {args.max_restarts} times')
  queue = pool.Queue(pool.queue_path(args.workdir), pool.sweep_jobs(args.config, args.workdir),
                     gcloud)
  failure = None
  try:
    pool.run(slices, queue, os.path.join(root, 'runs'), args.max_restarts, args.poll, args.grace)
  except Error as e:  # the queue is finished all the same, with runs that failed
    failure = e
  if not args.keep_slices:  # the pool would only cost money now
    for s in slices:
      say(f'{s.name}: deleting it (--keep_slices keeps the pool)')
      s.delete()
  if failure:
    raise failure
  say(f'every run is done; fit them: python -m lmjax.scaling.sweep --config={args.config} '
      f'--workdir={args.workdir} --mode=report')


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m launch.tpu', description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='verb', required=True)

  def common(q, name_required=True):
    q.add_argument('name', nargs=None if name_required else '?', default='',
                   help='slice name (the queued resource and its TPU VM)')
    q.add_argument('--zone', default='', help='e.g. us-central2-b')
    q.add_argument('--project', default='', help='default: gcloud config get project')
    q.add_argument('--log_dir', default='/tmp/lmjax_launch', help='<log_dir>/<name>/worker-<i>.log')
    q.add_argument('--poll', type=float, default=30.0, help='seconds between state checks')
    q.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                   help='print every command instead of running it')

  def slice_flags(q):
    q.add_argument('--accelerator', default='', help='v4-8, v5p-32, v5e-16 (= v5litepod-16), v6e-64')
    q.add_argument('--runtime', default='', help='TPU software version; default: by family')
    tier = q.add_mutually_exclusive_group()
    tier.add_argument('--spot', action='store_true', help='spot capacity (preemptible)')
    tier.add_argument('--reserved', action='store_true', help="the project's reserved capacity")

  def restart_flags(q):
    q.add_argument('--max_restarts', type=int, default=3)
    q.add_argument('--grace', type=float, default=60.0,
                   help='seconds between SIGTERM (checkpoint) and SIGKILL when stopping workers')

  for verb in ('create', 'status', 'logs', 'stop', 'delete'):
    q = sub.add_parser(verb)
    common(q)
    if verb == 'create':
      slice_flags(q)
    if verb == 'logs':
      q.add_argument('--worker', type=int, default=0)
      q.add_argument('--lines', type=int, default=50)
      q.add_argument('--run', default='', help='a sweep pool: the run whose log to show')
  q = sub.add_parser('run')
  common(q, name_required=False)
  slice_flags(q)
  restart_flags(q)
  q.add_argument('--backend', choices=('tpu', 'local', 'slurm'), default='tpu')
  q.add_argument('--processes', type=int, default=2, help='local: processes')
  q.add_argument('--devices_per_process', type=int, default=1, help='local, CPU: fake devices')
  gpus = os.environ.get('SLURM_GPUS_ON_NODE', '')
  q.add_argument('--tasks_per_node', type=int, default=int(gpus) if gpus.isdigit() else 1,
                 help="slurm: tasks per node, one per GPU (default: the allocation's GPUs per node)")
  q = sub.add_parser('sweep')
  common(q)
  slice_flags(q)
  restart_flags(q)
  q.add_argument('--slices', type=int, default=1, help='slices in the pool: NAME-0, NAME-1, ...')
  q.add_argument('--config', required=True, help='configs/<sweep>.py[:knobs]')
  q.add_argument('--workdir', required=True, help='the sweep directory, gs://BUCKET/PATH')
  q.add_argument('--keep_slices', action='store_true', help='keep the pool when the queue is done')
  return p


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  split = argv.index('--') if '--' in argv else len(argv)
  args = parser().parse_args(argv[:split])
  args.command = argv[split + 1:]  # run: the command, everything after --
  if args.dry_run:
    args.poll = 0.0
  signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the workers too
  commands = dict(create=cmd_create, run=cmd_run, status=cmd_status, logs=cmd_logs, stop=cmd_stop,
                  delete=cmd_delete, sweep=cmd_sweep)
  try:
    commands[args.verb](args, Gcloud(args.project, args.dry_run))
  except Error as e:
    print(f'launch.tpu: error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
