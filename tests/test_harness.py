"""lmjax's lm-evaluation-harness adapter (lmjax/eval/harness.py) against the harness's own Hugging
Face backend: the golden outputs scripts/make_harness_golden.py saved where torch and transformers
exist (tests/assets/harness/golden.json), reproduced here without either."""
import json
import os
import shutil
import subprocess
import sys

import lm_eval
import numpy as np
import pytest

from lmjax.eval import harness  # noqa: F401  (registers the model type 'lmjax')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, 'tests', 'assets', 'harness')
TASKS = ('lmjax_parity_mc', 'lmjax_parity_ppl', 'lmjax_parity_gen')


def parity_model(directory) -> str:
  """llama_tied with the parity tokenizer, as the golden script assembled it."""
  os.makedirs(directory, exist_ok=True)
  for name in ('config.json', 'model.safetensors'):
    shutil.copy(os.path.join(ROOT, 'tests', 'assets', 'hf', 'llama_tied', name), directory)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(ASSETS, 'tokenizer', name), directory)
  return str(directory)


def evaluate(model_args: str, batch_size: int = 4) -> dict:
  return lm_eval.simple_evaluate(
      model='lmjax', model_args=model_args, tasks=list(TASKS), batch_size=batch_size, log_samples=True,
      task_manager=lm_eval.tasks.TaskManager(include_path=os.path.join(ASSETS, 'tasks')))


def requests(out: dict, task: str) -> list:
  return [s['resps'] for s in sorted(out['samples'][task], key=lambda s: s['doc_id'])]


@pytest.fixture(scope='module')
def golden():
  with open(os.path.join(ASSETS, 'golden.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def lmjax_out(tmp_path_factory):
  return evaluate(f'hf={parity_model(tmp_path_factory.mktemp("parity"))}')


def test_loglikelihoods_match_the_hf_backend(golden, lmjax_out):
  for task in ('lmjax_parity_mc', 'lmjax_parity_ppl'):
    want, got = golden['requests'][task], requests(lmjax_out, task)
    assert len(got) == len(want)
    for doc_want, doc_got in zip(want, got):
      ll_want = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in doc_want]
      ll_got = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in doc_got]
      np.testing.assert_allclose(ll_got, ll_want, atol=1e-4, rtol=1e-6, err_msg=task)  # f32 sums
      if task == 'lmjax_parity_mc':  # the greedy flags
        assert [bool(r[0][1]) for r in doc_got] == [r[0][1] for r in doc_want]


def test_generated_strings_equal_the_hf_backends(golden, lmjax_out):
  got = requests(lmjax_out, 'lmjax_parity_gen')
  assert [[list(r) for r in doc] for doc in got] == golden['requests']['lmjax_parity_gen']


def test_metrics_equal_the_hf_backends(golden, lmjax_out):
  for task, metrics in golden['metrics'].items():
    got = {k.split(',')[0]: v for k, v in lmjax_out['results'][task].items()
           if k.endswith(',none') and '_stderr' not in k}
    assert set(got) == set(metrics), task
    for name, value in metrics.items():
      assert got[name] == pytest.approx(value, rel=1e-5), (task, name)


def test_eight_data_shards_give_the_one_device_results(lmjax_out, tmp_path):
  """The adapter on 8 fake CPU devices (rows split over the data axis) scores as on one."""
  script = (f'import json, sys\nsys.path.insert(0, {os.path.join(ROOT, "tests")!r})\n'
            'import jax, test_harness\nassert len(jax.devices()) == 8\n'
            f'out = test_harness.evaluate("hf={parity_model(tmp_path / "model")}", batch_size=8)\n'
            'print(json.dumps({t: test_harness.requests(out, t) for t in test_harness.TASKS}))\n')
  run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS='cpu',
                                XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert run.returncode == 0, run.stderr[-3000:]
  sharded = json.loads(run.stdout.strip().splitlines()[-1])
  for task in TASKS:
    one = json.loads(json.dumps(requests(lmjax_out, task)))  # tuples as lists, as the subprocess's
    assert sharded[task] == one, task


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A tiny lmjax run of 4 steps (tests/test_evaluate.py's, rows of 256 tokens)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import test_evaluate  # pylint: disable=import-outside-toplevel
  from lmjax import train  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('run')
  corpus = test_evaluate.write_jsonl(root / 'docs.jsonl', test_evaluate.documents(30, 2))
  workdir = str(root / 'run')
  config = test_evaluate.tiny_config(corpus)
  config.train.seq_len = 256  # the parity tasks' choices run to ~80 tokens of its tokenizer
  train.run(config, workdir)
  return workdir


def test_harness_tasks_on_a_run_from_simple_evaluate_and_the_command_line(run_dir):
  """simple_evaluate(model='lmjax', model_args='workdir=RUN') and `python -m lmjax.evaluate
  --harness_tasks` give the same scores; acc is the share of examples whose answer scored highest."""
  out = lm_eval.simple_evaluate(
      model='lmjax', model_args=f'workdir={run_dir},checkpoint=4', tasks=['lmjax_parity_mc'],
      log_samples=True, task_manager=lm_eval.tasks.TaskManager(include_path=os.path.join(ASSETS, 'tasks')))
  samples = sorted(out['samples']['lmjax_parity_mc'], key=lambda s: s['doc_id'])
  acc = np.mean([int(np.argmax([r[0][0] for r in s['resps']]) == s['doc']['answer']) for s in samples])
  assert out['results']['lmjax_parity_mc']['acc,none'] == pytest.approx(acc)
  assert all(r[0][0] < 0 for s in samples for r in s['resps'])  # log-probabilities of real text
  run = subprocess.run([sys.executable, '-m', 'lmjax.evaluate', f'--workdir={run_dir}', '--checkpoint=4',
                        '--harness_tasks=lmjax_parity_mc,lmjax_parity_gen',
                        f'--include_path={os.path.join(ASSETS, "tasks")}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert run.returncode == 0, run.stderr[-3000:]
  assert '|lmjax_parity_mc' in run.stdout.replace(' ', '')  # the harness's table
  with open(os.path.join(run_dir, 'evaluations.jsonl')) as f:
    (record,) = [json.loads(line) for line in f]
  assert record['harness/lmjax_parity_mc/acc'] == pytest.approx(acc)
  assert {'harness/lmjax_parity_mc/acc_norm', 'harness/lmjax_parity_gen/exact_match'} <= set(record)
  unknown = subprocess.run([sys.executable, '-m', 'lmjax.evaluate', f'--workdir={run_dir}',
                            '--harness_tasks=no_such_task'], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert unknown.returncode == 2 and unknown.stderr.strip().splitlines()[-1].startswith(
      "lmjax.evaluate: error: harness tasks ['no_such_task']: not tasks of lm-eval")


def test_harness_tasks_during_training_reach_metrics_jsonl(tmp_path):
  """config.eval.harness_tasks: the trainer's hook scores them every harness_every steps and at the
  end, as harness/<task>/<metric> in metrics.jsonl; the same score as the evaluate command's."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import test_evaluate  # pylint: disable=import-outside-toplevel
  corpus = test_evaluate.write_jsonl(tmp_path / 'docs.jsonl', test_evaluate.documents(30, 2))
  config_file = tmp_path / 'cfg.py'
  config_file.write_text(
      'import sys\n'
      f'sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n'
      'import test_evaluate\n\n\ndef get_config(arg=None):\n'
      f'  c = test_evaluate.tiny_config({corpus!r})\n'
      "  c.eval.harness_tasks = ('lmjax_parity_ppl',)\n"
      '  c.eval.harness_every = 2\n'
      f'  c.eval.harness_include_path = {os.path.join(ASSETS, "tasks")!r}\n'
      '  return c\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  workdir = tmp_path / 'run'
  run = subprocess.run([sys.executable, '-m', 'lmjax.train', f'--config={config_file}', f'--workdir={workdir}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  scored = {m['step']: m['harness/lmjax_parity_ppl/bits_per_byte'] for m in metrics
            if 'harness/lmjax_parity_ppl/bits_per_byte' in m}
  assert sorted(scored) == [2, 4]
  again = subprocess.run([sys.executable, '-m', 'lmjax.evaluate', f'--workdir={workdir}',
                          '--harness_tasks=lmjax_parity_ppl', f'--include_path={os.path.join(ASSETS, "tasks")}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  (record,) = [json.loads(line) for line in (workdir / 'evaluations.jsonl').read_text().splitlines()]
  assert record['step'] == 4
  assert record['harness/lmjax_parity_ppl/bits_per_byte'] == pytest.approx(scored[4], rel=1e-6)
  assert 3 < scored[4] < scored[2]  # a tiny model on 4 steps: still near uniform, and learning


def test_the_shipped_local_tasks_run_offline_on_a_run(run_dir):
  """lmjax/eval/tasks: the legal cloze (multiple choice) and arithmetic (generation) tasks load from
  the package, with no --include_path and no network, and score as their definitions say."""
  scorer = harness.run_scorer(run_dir, 4, 8)
  metrics, table = harness.evaluate(scorer, ['lmjax_legal_cloze', 'lmjax_arithmetic'], limit=8)
  assert set(metrics) == {'harness/lmjax_legal_cloze/acc', 'harness/lmjax_legal_cloze/acc_norm',
                          'harness/lmjax_arithmetic/exact_match'}
  assert all(v in [i / 8 for i in range(9)] for v in metrics.values())  # shares of 8 examples
  assert 'lmjax_legal_cloze' in table


@pytest.mark.slow
def test_two_processes_give_the_one_device_results(lmjax_out, tmp_path):
  """The adapter across 2 processes (launch/local.py, 4 fake CPU devices each, one mesh over both):
  each process feeds its rows and gathers all scores; process 0's results equal one device's."""
  out = tmp_path / 'results.json'
  script = (f'import json, sys\nsys.path.insert(0, {os.path.join(ROOT, "tests")!r})\n'
            'from lmjax import distributed\ndistributed.initialize()\n'
            'import jax, test_harness\nassert len(jax.devices()) == 8\n'
            f'res = test_harness.evaluate("hf={parity_model(tmp_path / "model")}", batch_size=8)\n'
            'if jax.process_index() == 0:\n'
            f'  json.dump({{t: test_harness.requests(res, t) for t in test_harness.TASKS}}, open({str(out)!r}, "w"))\n')
  run = subprocess.run([sys.executable, 'launch/local.py', '--processes=2', '--devices_per_process=4',
                        f'--log_dir={tmp_path / "logs"}', '--', sys.executable, '-c', script],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  logs = ''.join(p.read_text()[-2000:] for p in (tmp_path / 'logs').rglob('*.log'))
  assert run.returncode == 0, run.stderr[-2000:] + logs
  two = json.loads(out.read_text())
  for task in TASKS:
    assert two[task] == json.loads(json.dumps(requests(lmjax_out, task))), task


def test_config_eval_is_checked_before_training():
  from lmjax import config as config_lib, errors  # pylint: disable=import-outside-toplevel
  config = config_lib.load(os.path.join(ROOT, 'configs', 'tiny.py'))
  config.eval.harness_tasks = ('hellaswag,arc_easy', 'piqa')  # a flag gives one comma-separated string
  assert config_lib.harness_task_names(config.eval) == ['hellaswag', 'arc_easy', 'piqa']
  config.eval.harness_every = -1
  with pytest.raises(errors.ConfigError, match=r'config.eval.harness_every=-1'):
    config_lib.validate(config)
  with pytest.raises(errors.ConfigError, match=r"harness tasks \['no_such_task'\]"):
    harness.task_manager(['no_such_task', 'lmjax_arithmetic'], None)


def test_lmjax_heldout_scores_each_sources_held_out_documents(run_dir):
  """lmjax_heldout: a rolling-perplexity task per source over the run's held-out documents; a document
  shorter than a window scores the sum of log p(token | the tokens before it) after BOS, as model.apply's
  full logits with a float64 log-softmax give it (the adapter scores through the chunked loss; the hf
  backend's windows: BOS, given BOS, first)."""
  from lmjax import config as config_lib, model  # pylint: disable=import-outside-toplevel
  from lmjax.data import prepare  # pylint: disable=import-outside-toplevel
  config = config_lib.from_run(run_dir)
  scorer = harness.run_scorer(run_dir, 4, 8)
  out = lm_eval.simple_evaluate(model=harness.LmjaxLM(scorer=scorer), tasks=harness.heldout_tasks(config, run_dir),
                                log_samples=True)
  assert set(out['results']) == {'lmjax_heldout_code'}
  assert out['results']['lmjax_heldout_code']['bits_per_byte,none'] > 0
  docs = prepare.cleaned_documents(config.data, run_dir, 'code')['eval']
  sample = min(out['samples']['lmjax_heldout_code'], key=lambda s: len(s['doc']['text']))
  ids = scorer.tokenizer.encode(sample['doc']['text'])
  assert sample['doc']['text'] in docs and len(ids) + 1 < scorer.max_length  # one window
  seq = [scorer.tokenizer.bos_id, scorer.tokenizer.bos_id, *ids]  # context BOS, targets BOS + text
  batch = {'inputs': np.array([seq[:-1]]), 'positions': np.arange(len(seq) - 1)[None],
           'segment_ids': np.ones((1, len(seq) - 1), np.int32)}
  logits = np.asarray(model.apply(scorer.graphdef, scorer.params, batch), np.float64)[0]
  logits = logits[:, :scorer.tokenizer.vocab_size]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  want = logp[np.arange(len(seq) - 1), seq[1:]].sum()
  assert sample['resps'][0][0] == pytest.approx(want, rel=1e-5)
