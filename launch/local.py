"""Runs a command as N cooperating JAX processes on this machine (a multi-host run in miniature).

  python launch/local.py --processes=2 --devices_per_process=4 -- \
      python -m lmjax.train --config=configs/tiny.py --workdir=/tmp/mp

The same as `python -m launch.tpu run --backend=local ...` (launch/workers.py, Local), without
restarts unless --max_restarts is given: each process gets LMJAX_COORDINATOR / LMJAX_NUM_PROCESSES /
LMJAX_PROCESS_ID, which `lmjax.distributed.initialize` turns into `jax.distributed.initialize(...)`;
on CPU each process fakes `--devices_per_process` devices. Process 0's output is shown; every
process's goes to <log_dir>/local/worker-<i>.log. When one process fails the others are stopped and
the exit code is 1.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from launch import tpu  # pylint: disable=wrong-import-position

if __name__ == '__main__':
  sys.exit(tpu.main(['run', '--backend=local', '--max_restarts=0', *sys.argv[1:]]))
