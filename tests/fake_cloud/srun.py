"""A stand-in for SLURM's `srun` in tests: runs the command as --ntasks-per-node tasks on this one
node, with SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS set, and with --label prefixes each output line
with 'N: ' as srun does. Exits with the first non-zero exit code of a task."""
import os
import subprocess
import sys
import threading


def main():
  args = sys.argv[1:]
  options = {}
  while args and args[0].startswith('--'):
    key, _, value = args.pop(0)[2:].partition('=')
    options[key] = value
  tasks = int(options.get('ntasks-per-node', 1))
  procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                                     SLURM_NTASKS=str(tasks)))
           for i in range(tasks)]
  lock = threading.Lock()

  def relay(i, stream):
    for line in stream:
      with lock:
        sys.stdout.buffer.write((f'{i}: ' if 'label' in options else '').encode() + line)
        sys.stdout.flush()

  threads = [threading.Thread(target=relay, args=(i, p.stdout)) for i, p in enumerate(procs)]
  for t in threads:
    t.start()
  codes = [p.wait() for p in procs]
  for t in threads:
    t.join()
  return next((c for c in codes if c), 0)


if __name__ == '__main__':
  sys.exit(main())
