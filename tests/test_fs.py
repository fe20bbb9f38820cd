"""The filesystem layer (lmjax/fs.py) and the run files that go through it, on stand-ins for GCS:
memory:// (fsspec's in-memory object store) and file:// (the object-store route on a local disk),
beside plain local paths. Orbax knows neither memory:// nor file://, so the run on a URL workdir is a
file:// one (its checkpoints go to the local path), and the metrics, TensorBoard, resume, config and
tokenizer pieces are tested on memory://."""
import glob
import json
import os
import time
import types
import uuid

import fsspec
import ml_collections
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmjax import config as config_lib, fs, init_from, resume, train, trainer
from lmjax.data import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = 'def f(x):\n\treturn {"a": [1, 2.5e-3]}  # naïve\n' * 20


def _memory_root():
  return f'memory://lmjax-test-{uuid.uuid4().hex}'


def _names(path):
  """The names in a directory, read with fsspec directly (not through the layer under test)."""
  fs_, p = fsspec.core.url_to_fs(path)
  return sorted(os.path.basename(e.rstrip('/')) for e in fs_.ls(p, detail=False))


def _exists(path):
  fs_, p = fsspec.core.url_to_fs(path)
  return fs_.exists(p)


@pytest.fixture(params=['local', 'file', 'memory'])
def root(request, tmp_path):
  if request.param == 'memory':
    url = _memory_root()
    yield url
    fs.rmtree(url)
  else:
    yield ('file://' if request.param == 'file' else '') + str(tmp_path / 'root')


def test_files_and_directories(root):
  fs.makedirs(os.path.join(root, 'a', 'b'))
  fs.write_atomic(os.path.join(root, 'a', 'b', 'x.txt'), 'naïve\n')
  fs.write_atomic(os.path.join(root, 'a', 'y.bin'), b'\x00\x01')
  assert fs.read_text(os.path.join(root, 'a', 'b', 'x.txt')) == 'naïve\n'
  with fs.open(os.path.join(root, 'a', 'y.bin'), 'rb') as f:
    assert f.read() == b'\x00\x01'
  assert fs.isdir(os.path.join(root, 'a')) and not fs.isfile(os.path.join(root, 'a'))
  assert fs.isfile(os.path.join(root, 'a', 'y.bin')) and not fs.isfile(os.path.join(root, 'nope'))
  assert _names(os.path.join(root, 'a')) == ['b', 'y.bin']
  fs.rmtree(os.path.join(root, 'a'))
  fs.rmtree(os.path.join(root, 'a'))  # missing: not an error
  assert not _exists(os.path.join(root, 'a'))


def test_write_atomic_replaces_whole_and_leaves_nothing_beside(root):
  path = os.path.join(root, 'config.json')
  fs.makedirs(root)
  fs.write_atomic(path, 'old')
  fs.write_atomic(path, 'new')
  assert fs.read_text(path) == 'new'
  assert _names(root) == ['config.json']


def test_append_creates_then_appends(root):
  path = os.path.join(root, 'metrics.jsonl')
  fs.makedirs(root)
  fs.append_text(path, '{"step": 1}\n')
  fs.append_text(path, '{"step": 2}\n')
  assert fs.read_text(path) == '{"step": 1}\n{"step": 2}\n'


def test_replace_moves_files_and_directories(root):
  fs.makedirs(root)
  fs.write_atomic(os.path.join(root, 'a.tmp'), 'new')
  fs.write_atomic(os.path.join(root, 'a'), 'old')
  fs.replace(os.path.join(root, 'a.tmp'), os.path.join(root, 'a'))
  assert fs.read_text(os.path.join(root, 'a')) == 'new' and _names(root) == ['a']
  # A damaged checkpoint step moved aside (lmjax/checkpoint.py).
  fs.makedirs(os.path.join(root, 'checkpoints', '4', 'state'))
  fs.write_atomic(os.path.join(root, 'checkpoints', '4', 'state', 'x'), 'x')
  fs.write_atomic(os.path.join(root, 'checkpoints', '4', 'commit_success.txt'), 'ok')
  fs.makedirs(os.path.join(root, 'checkpoints_corrupt'))
  fs.replace(os.path.join(root, 'checkpoints', '4'), os.path.join(root, 'checkpoints_corrupt', '4'))
  assert not _exists(os.path.join(root, 'checkpoints', '4'))
  assert fs.read_text(os.path.join(root, 'checkpoints_corrupt', '4', 'state', 'x')) == 'x'
  assert _names(os.path.join(root, 'checkpoints_corrupt', '4')) == ['commit_success.txt', 'state']


def test_upload_copies_a_local_tree(root, tmp_path):
  local = tmp_path / 'tb'
  (local / 'sub').mkdir(parents=True)
  (local / 'events.1').write_bytes(b'a')
  (local / 'sub' / 'events.2').write_bytes(b'b')
  fs.upload(str(local), os.path.join(root, 'tb'))
  (local / 'events.1').write_bytes(b'ab')  # grown since: copied again whole
  fs.upload(str(local), os.path.join(root, 'tb'))
  assert _names(os.path.join(root, 'tb')) == ['events.1', 'sub']
  assert fs.read_text(os.path.join(root, 'tb', 'events.1')) == 'ab'
  assert fs.read_text(os.path.join(root, 'tb', 'sub', 'events.2')) == 'b'


def test_unknown_scheme_names_the_path():
  with pytest.raises(ValueError, match=r"'nope://b/x'.*expected a local path or a gs:// URL"):
    fs.isfile('nope://b/x')


def test_metrics_and_tensorboard_on_an_object_store_read_as_one_run_after_a_resume():
  workdir = _memory_root()
  config = ml_collections.ConfigDict(dict(train=dict(trackers=('tensorboard',))))

  def writer(start_step):
    return trainer.MetricsWriter(types.SimpleNamespace(workdir=workdir, start_step=start_step,
                                                       config=config))
  w = writer(0)
  for step in range(1, 5):
    w.write(step, {'loss': 5.0 - step, 'note': 'x'})
  tb = os.path.join(workdir, 'tb')
  assert len(_names(tb)) == 1  # copied at each record, before close
  w.close()
  assert not os.path.exists(w._tb_local)  # the local copy is gone
  time.sleep(1.0)  # event files are named by the second they were opened in
  w = writer(2)  # resumed from the checkpoint of step 2: steps 3 and 4 are logged again
  w.write(3, {'loss': 1.5})
  w.close()
  records = [json.loads(l) for l in fs.read_text(os.path.join(workdir, 'metrics.jsonl')).splitlines()]
  assert [(r['step'], r['loss']) for r in records] == [(1, 4.0), (2, 3.0), (3, 1.5)]
  assert records[0]['note'] == 'x'
  events = _names(tb)  # the resumed writer's file (with its purge step) beside the first
  assert len(events) == 2 and all(e.startswith('events.out.tfevents.') for e in events)
  fs.rmtree(workdir)


def test_config_and_config_changes_on_an_object_store():
  workdir = _memory_root()
  assert resume.read_config(os.path.join(workdir, 'config.json')) is None
  fs.write_atomic(os.path.join(workdir, 'config.json'), json.dumps({'train': {'steps': 4}}))
  assert resume.read_config(os.path.join(workdir, 'config.json')) == {'train': {'steps': 4}}
  changes = [dict(field='train.steps', old=4, new=6, step=4)]
  resume.record(os.path.join(workdir, 'config_changes.jsonl'), changes)
  resume.record(os.path.join(workdir, 'config_changes.jsonl'), changes)
  lines = fs.read_text(os.path.join(workdir, 'config_changes.jsonl')).splitlines()
  assert [json.loads(l) for l in lines] == changes * 2
  fs.rmtree(workdir)


def test_tokenizers_load_from_an_object_store(tmp_path):
  store = _memory_root()
  sp = tokenizer.train(TEXT.splitlines(), os.path.join(store, 'sp', 'tokenizer.model'), vocab_size=300,
                       num_threads=1)
  again = tokenizer.load(os.path.join(store, 'sp', 'tokenizer.model'))
  assert again.path == sp.path and again.vocab_size == 300
  assert again.decode(again.encode(TEXT)) == TEXT and again.encode(TEXT) == sp.encode(TEXT)
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<unk>', '<s>', '</s>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fs.write_atomic(os.path.join(store, 'hf', 'tokenizer.json'), hf.to_str())
  fs.write_atomic(os.path.join(store, 'hf', 'tokenizer_config.json'),
                  json.dumps(dict(bos_token='<s>', eos_token='</s>')))
  tok = tokenizer.load(os.path.join(store, 'hf'))  # a directory holding tokenizer.json
  assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.decode(tok.encode(TEXT)) == TEXT
  with pytest.raises(FileNotFoundError, match='nope.model'):
    tokenizer.load(os.path.join(store, 'nope.model'))
  # A run whose parent is on the object store inherits the tokenizer its provenance.json names.
  fs.write_atomic(os.path.join(store, 'parent', 'provenance.json'), json.dumps({'tokenizer': sp.path}))
  config = ml_collections.ConfigDict(dict(init_from=os.path.join(store, 'parent'),
                                          data=dict(tokenizer=dict(path=''))))
  assert init_from.tokenizer_of(config.init_from, config.data.tokenizer.path) == sp.path
  fs.rmtree(store)


@pytest.mark.slow
def test_a_run_on_a_url_workdir_writes_and_resumes_through_the_layer(tmp_path):
  """The whole trainer on a file:// workdir, which takes the object-store route of every file."""
  workdir = 'file://' + str(tmp_path / 'run')
  config = config_lib.load(os.path.join(ROOT, 'configs', 'tiny.py'), 'steps=2')
  config.train.update(batch_size=8, seq_len=32, log_every=1, eval_every=1000, checkpoint_every=2,
                      async_checkpoint=False)
  config.data.cache_dir = str(tmp_path / 'data')
  train.run(config, workdir)
  local = str(tmp_path / 'run')
  assert sorted(os.listdir(local)) == ['checkpoints', 'config.json', 'data_report.json', 'data_report.png',
                                       'metrics.jsonl', 'provenance.json', 'tb']
  assert glob.glob(os.path.join(local, 'tb', 'events.out.tfevents.*'))
  assert json.loads(fs.read_text(os.path.join(workdir, 'provenance.json')))['tokenizer'].startswith(
      str(tmp_path / 'data'))
  config.train.steps = 3  # extended: resumes from step 2, recorded as a change
  train.run(config, workdir)
  records = [json.loads(l) for l in fs.read_text(os.path.join(workdir, 'metrics.jsonl')).splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == [1, 2, 3]
  changes = [json.loads(l) for l in fs.read_text(os.path.join(workdir, 'config_changes.jsonl')).splitlines()]
  assert changes == [dict(field='train.steps', old=2, new=3, step=2)]
  assert json.loads(fs.read_text(os.path.join(workdir, 'config.json')))['train']['steps'] == 3
