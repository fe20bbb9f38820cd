"""Runs a command as N cooperating JAX processes on this machine (a multi-host run in miniature).

  python launch/local.py --processes=2 --devices_per_process=4 -- \
      python -m lmjax.train --config=configs/tiny.py --workdir=/tmp/mp

Each process gets LMJAX_COORDINATOR / LMJAX_NUM_PROCESSES / LMJAX_PROCESS_ID, which
`lmjax.distributed.initialize` turns into `jax.distributed.initialize(...)`; on CPU each process fakes
`--devices_per_process` devices. Process 0's output is shown; the others' goes to <log_dir>/process_<i>.log.
The exit code is the first non-zero exit code of any process.
"""
import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1, help='CPU only: fake devices')
  parser.add_argument('--log_dir', default='/tmp/lmjax_launch')
  parser.add_argument('command', nargs=argparse.REMAINDER)
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command to run after --')
  os.makedirs(args.log_dir, exist_ok=True)
  coordinator = f'127.0.0.1:{free_port()}'
  procs = []
  for i in range(args.processes):
    env = dict(os.environ, LMJAX_COORDINATOR=coordinator, LMJAX_NUM_PROCESSES=str(args.processes),
               LMJAX_PROCESS_ID=str(i))
    if args.devices_per_process > 1:
      env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices_per_process}'
    out = None if i == 0 else open(os.path.join(args.log_dir, f'process_{i}.log'), 'w')
    procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=out))
  codes = [p.wait() for p in procs]
  sys.exit(next((c for c in codes if c), 0))


if __name__ == '__main__':
  main()
