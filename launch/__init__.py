"""Launchers, run from the repository root as `python -m launch.tpu ...` (docs/launch.md).

- workers.py: one multi-host command as a group of worker processes, restarted after failures;
  the local (N processes) and SLURM backends.
- tpu.py: the CLI (create, run, status, logs, stop, delete, sweep).
- tpu_slice.py: a Cloud TPU slice through gcloud, the only cloud dependency.
- pool.py: a scaling sweep on a pool of slices, queued in a resumable file.
- local.py: `python launch/local.py`, the local backend under its older name.
"""
