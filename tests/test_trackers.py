"""Experiment trackers besides metrics.jsonl: TensorBoard always, Weights & Biases when configured
(offline here: no network)."""
import glob
import os

import pytest

from lmjax import config as config_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wandb_offline_run_is_written_and_continued_on_resume(tmp_path, monkeypatch):
  pytest.importorskip('wandb', reason="pip install -e '.[wandb]'")
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  config = config_lib.load(os.path.join(ROOT, 'configs', 'tiny.py'), 'steps=2')
  config.train.update(batch_size=8, seq_len=32, log_every=1, checkpoint_every=1,
                      trackers=('tensorboard', 'wandb'))
  config.data.cache_dir = str(tmp_path / 'data')
  workdir = str(tmp_path / 'run')
  train.run(config, workdir)
  run_id = open(os.path.join(workdir, 'wandb_id')).read().strip()
  runs = glob.glob(os.path.join(workdir, 'wandb', f'offline-run-*-{run_id}', f'run-{run_id}.wandb'))
  assert len(runs) == 1 and os.path.getsize(runs[0]) > 0
  assert glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*'))
  config.train.steps = 3  # extended: the same W&B run goes on
  train.run(config, workdir)
  assert open(os.path.join(workdir, 'wandb_id')).read().strip() == run_id


def test_unknown_tracker_names_the_field():
  config = config_lib.load(os.path.join(ROOT, 'configs', 'tiny.py'))
  config.train.trackers = ('tensorboard', 'mlflow')
  with pytest.raises(ValueError, match=r"config\.train\.trackers: unknown \['mlflow'\]"):
    config_lib.validate(config)
