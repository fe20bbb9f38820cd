"""Multi-process start-up: call `initialize()` first thing in an entry point, before any JAX work.

- `launch/local.py` (N processes on one machine) sets LMJAX_COORDINATOR, LMJAX_NUM_PROCESSES and
  LMJAX_PROCESS_ID.
- On a Cloud TPU pod slice or a SLURM / GKE GPU cluster, set LMJAX_DISTRIBUTED=auto on every host
  and JAX detects the cluster itself (`python -m launch.tpu run` does this).
- Otherwise this is a single-process run and nothing happens.
"""
import os

import jax


def initialize() -> None:
  if 'LMJAX_COORDINATOR' in os.environ:
    # Cross-process collectives between CPU devices (tests, laptops); no effect on GPU/TPU devices.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=os.environ['LMJAX_COORDINATOR'],
                               num_processes=int(os.environ['LMJAX_NUM_PROCESSES']),
                               process_id=int(os.environ['LMJAX_PROCESS_ID']))
  elif os.environ.get('LMJAX_DISTRIBUTED') == 'auto':
    jax.distributed.initialize()
