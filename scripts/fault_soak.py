"""Fault injection: kill -9 (or Ctrl-C) a training run at random steps, again and again, then check
that the resumed run's whole loss curve equals an uninterrupted run's at every step.

  python scripts/fault_soak.py --kills=200 --workdir=/tmp/soak [--seed=0] [--steps=N] [--signal=INT]

Each attempt runs the run's own command in a fresh process that SIGKILLs itself at a random step
after its start (with --signal=INT it sends itself SIGINT instead, as Ctrl-C does: the run must
finish the step, checkpoint it and exit 130, so the next attempt resumes right there): most kills land between checkpoints (the steps since the last checkpoint are lost
and redone), and every fifth lands right after an asynchronous checkpoint write has started (the
write is torn; orbax's atomic commit must hide it). After the last kill the run finishes; its
metrics.jsonl must hold each step once (stale rows dropped on resume) with the straight run's
losses, learning rates and data epochs. Prints the figures and exits non-zero on a mismatch.
tests/test_faults.py runs it with 20 kills; the soak's figures are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The run: the tiny config, small and fast, a checkpoint every 2 steps.
OVERRIDES = dict(batch_size=8, seq_len=32, log_every=1, eval_every=1000, checkpoint_every=2)

CHILD = textwrap.dedent('''
    import json, os, signal, sys
    from lmjax import config as config_lib, errors, train, trainer
    workdir, steps, kill_step, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    sig = getattr(signal, f'SIG{sys.argv[6]}')
    config = config_lib.load('configs/tiny.py', f'steps={steps}')
    config.train.update(json.loads(sys.argv[5]))
    config.data.cache_dir = cache  # prepared once, shared by every attempt
    def kill(info):  # runs after the checkpoint hook: at a checkpoint step its async write is under way
      if info.step == kill_step:
        os.kill(os.getpid(), sig)
    try:
      train.run(config, workdir, extra_hooks=[trainer.Hook(1, kill)])
    except errors.Interrupted:
      sys.exit(130)
''')


def records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


def curve(rows: list[dict]) -> dict[int, tuple]:
  keep = ('loss', 'lr', 'grad_norm', 'data/code/epochs')
  return {r['step']: tuple(r[k] for k in keep) for r in rows if 'loss' in r}


EXIT = {'KILL': -9, 'INT': 130}  # how an attempt stopped by each signal exits


def attempt(workdir: str, steps: int, kill_step: int, cache: str, env: dict, sig: str = 'KILL') -> int:
  proc = subprocess.run([sys.executable, '-c', CHILD, workdir, str(steps), str(kill_step), cache,
                         json.dumps(OVERRIDES), sig],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if proc.returncode not in (0, EXIT[sig]):
    raise RuntimeError(f'attempt killed at {kill_step} exited {proc.returncode}:\n{proc.stderr[-3000:]}')
  return proc.returncode


def last_logged(workdir: str) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  return max((r['step'] for r in records(workdir) if 'loss' in r), default=0) if os.path.isfile(path) else 0


def soak(workdir: str, kills: int, steps: int, seed: int, sig: str = 'KILL') -> dict:
  """Runs the soak; returns its figures (raises AssertionError on a mismatch)."""
  rng = random.Random(seed)
  cache = os.path.join(workdir, 'data')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='',
             JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, 'xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  start = time.perf_counter()
  straight = os.path.join(workdir, 'straight')
  attempt(straight, steps, -1, cache, env)
  killed, done, torn = os.path.join(workdir, 'killed'), 0, 0
  while done < kills:
    resumed_from = last_logged(killed)  # an upper bound of the checkpoint it resumes from
    during_write = done % 5 == 4
    if during_write:  # the next checkpoint step at or after a random step
      k = resumed_from + rng.randint(1, 4)
      kill_step = k + (-k) % OVERRIDES['checkpoint_every']
    else:
      kill_step = resumed_from + rng.randint(1, 5)
    kill_step = min(kill_step, steps - 1)
    assert attempt(killed, steps, kill_step, cache, env, sig) == EXIT[sig]
    done += 1
    torn += during_write
  attempt(killed, steps, -1, cache, env)
  want, rows = curve(records(straight)), records(killed)
  got = curve(rows)
  train_steps = [r['step'] for r in rows if 'loss' in r]
  assert train_steps == sorted(set(train_steps)), f'metrics.jsonl repeats or reorders steps: {train_steps}'
  assert got == want, [s for s in want if got.get(s) != want[s]][:10]
  return dict(kills=done, kills_during_checkpoint_write=torn, steps=steps,
              seconds=round(time.perf_counter() - start, 1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=200)
  parser.add_argument('--steps', type=int, default=0, help='default: 2 steps a kill + 10')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--signal', choices=sorted(EXIT), default='KILL')
  a = parser.parse_args()
  print(json.dumps(soak(a.workdir, a.kills, a.steps or 2 * a.kills + 10, a.seed, a.signal)))


if __name__ == '__main__':
  main()
