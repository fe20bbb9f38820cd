"""lm-evaluation-harness throughput: lmjax's adapter (model type 'lmjax') against the harness's own
Hugging Face backend ('hf', PyTorch), same checkpoint, same tasks, in one call.

  python benchmarks/harness_throughput.py --variant=1b --examples=500 --gen=64 --batch_size=32

The checkpoint: a `--variant` model with random weights, saved in Hugging Face format (bf16) by
lmjax.convert, with a BPE tokenizer of exactly the model's vocabulary (trained on the tasks' text,
filled with plain word tokens: a random model's tokens all decode, in both backends). The tasks,
written to a temporary include path: a multiple-choice task of `--examples` examples x 4 choices
(contexts of 160 words of the Python reference's topics; every request a loglikelihood), and a
generation task of `--gen` prompts of `--max_gen_toks` greedy tokens (a random model seldom stops
early; the tokens generated are counted). Each backend runs in a process of its own (the whole card
each), loads the model once (timed apart), then runs each task twice: the first (cold) includes
lmjax's compiles, the second (warm) does not. Prints a JSON line per measurement and the ratios
lmjax / hf, end to end (simple_evaluate, the harness's own work included) and in the model's
request methods alone (loglikelihood, generate_until); `--lmjax_args` adds model_args to lmjax's (e.g. attention=cudnn), once per
run of lmjax.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MC, GEN = 'bench_mc', 'bench_gen'
UTILS = '''import json, os
import datasets
HERE = os.path.dirname(os.path.abspath(__file__))
def _load(name):
  with open(os.path.join(HERE, name + '.jsonl')) as f:
    return datasets.DatasetDict({'test': datasets.Dataset.from_list([json.loads(l) for l in f])})
def mc(**_): return _load('mc')
def gen(**_): return _load('gen')
'''
YAMLS = {
    MC: ('task: bench_mc\ncustom_dataset: !function utils.mc\ntest_split: test\noutput_type: '
         'multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: '
         '"{{answer}}"\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n'),
    GEN: ('task: bench_gen\ncustom_dataset: !function utils.gen\ntest_split: test\noutput_type: '
          'generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ngeneration_kwargs:\n'
          '  until: ["<never>"]\n  max_gen_toks: MAX_GEN\n  do_sample: false\nmetric_list:\n'
          '  - metric: exact_match\n'),
}


def write_tasks(directory: str, examples: int, gen: int, max_gen_toks: int) -> None:
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  text = ' '.join(topics.topics[k] for k in sorted(topics.topics)).split()
  rng = random.Random(0)

  def words(n):
    start = rng.randrange(len(text) - n)
    return ' '.join(text[start:start + n])

  with open(os.path.join(directory, 'mc.jsonl'), 'w') as f:
    for _ in range(examples):
      f.write(json.dumps({'context': words(160), 'choices': [' ' + words(8) for _ in range(4)],
                          'answer': rng.randrange(4)}) + '\n')
  with open(os.path.join(directory, 'gen.jsonl'), 'w') as f:
    for _ in range(gen):
      f.write(json.dumps({'question': words(80), 'answer': 'x'}) + '\n')
  with open(os.path.join(directory, 'utils.py'), 'w') as f:
    f.write(UTILS)
  for name, yaml in YAMLS.items():
    with open(os.path.join(directory, f'{name}.yaml'), 'w') as f:
      f.write(yaml.replace('MAX_GEN', str(max_gen_toks)))


SPECIALS = ['<unk>', '<s>', '</s>']


def write_tokenizer(directory: str, tasks: str, vocab_size: int) -> None:
  """A Metaspace BPE tokenizer.json of exactly `vocab_size` ids (<unk>, <s>, </s> first; <s> put
  before a text as Llama's is): BPE trained on the tasks' text, then word tokens '▁w<i>' to fill."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # pylint: disable=import-outside-toplevel
  with open(os.path.join(tasks, 'mc.jsonl')) as f:
    texts = [json.loads(line)['context'] for line in f]
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=min(vocab_size, 8000),
                                                     special_tokens=SPECIALS, show_progress=False))
  spec = json.loads(tok.to_str())
  vocab = spec['model']['vocab']
  fill = (f'\u2581w{i}' for i in range(vocab_size))
  while len(vocab) < vocab_size:
    word = next(fill)
    vocab.setdefault(word, len(vocab))
  tok = Tokenizer.from_str(json.dumps(spec))
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
  assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'unk_token': '<unk>', 'bos_token': '<s>',
               'eos_token': '</s>', 'pad_token': '<unk>'}, f)


def write_checkpoint(directory: str, tasks: str, variant: str) -> None:
  from lmjax import config as config_lib, convert, model  # pylint: disable=import-outside-toplevel
  c = config_lib.base()
  c.model.variant = variant
  args = model.resolve(c.model)
  _, params = model.create(args, 0)
  convert.save(directory, args, params, dtype='bfloat16', hf_config={'bos_token_id': 1, 'eos_token_id': 2})
  write_tokenizer(directory, tasks, args.vocab_size)


def make_model(backend: str, model_args: str, batch_size: int, device: str):
  import lm_eval  # pylint: disable=import-outside-toplevel
  import lmjax.eval.harness  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  cls = lm_eval.api.registry.get_model(backend)
  extra = {**({} if 'batch_size=' in model_args else {'batch_size': batch_size}),
           **({'device': device} if backend == 'hf' else {})}
  return cls.create_from_arg_string(model_args, extra)


def timed_requests(lm) -> list[float]:
  """Wraps lm's request methods so that the seconds spent in them add up in the returned list."""
  spent = [0.0]
  for name in ('loglikelihood', 'generate_until'):
    method = getattr(lm, name)

    def wrapper(*args, method=method, **kwargs):
      start = time.perf_counter()
      try:
        return method(*args, **kwargs)
      finally:
        spent[0] += time.perf_counter() - start
    setattr(lm, name, wrapper)
  return spent


def run(lm, spent: list[float], task: str, include: str) -> tuple[float, float, dict]:
  """(seconds of simple_evaluate, of them in the model's request methods, its output). The harness's
  index of its task library (TaskManager, seconds of YAML parsing whatever the model) is built
  before the clock starts."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  manager = TaskManager(include_path=include)
  spent[0] = 0.0
  start = time.perf_counter()
  out = lm_eval.simple_evaluate(model=lm, tasks=[task], log_samples=True, task_manager=manager)
  return time.perf_counter() - start, spent[0], out


def measure(backend: str, model_args: str, include: str, ckpt: str, batch_size: int, device: str
            ) -> list[dict]:
  """One backend's rows: its load time, then each task cold and warm."""
  start = time.perf_counter()
  lm = make_model(backend, model_args, batch_size, device)
  rows = [dict(backend=backend, load_s=round(time.perf_counter() - start, 2))]
  spent = timed_requests(lm)
  print(json.dumps(rows[-1]), flush=True)
  from lmjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  tok = tokenizer_lib.load(ckpt)
  for task in (MC, GEN):
    for attempt in ('cold', 'warm'):
      seconds, model_s, out = run(lm, spent, task, include)
      samples = out['samples'][task]
      if task == MC:
        n, unit = sum(len(s['resps']) for s in samples), 'requests'
      else:
        n, unit = sum(len(tok.encode(s['resps'][0][0])) for s in samples), 'generated_tokens'
      rows.append({'backend': backend, 'task': task, 'run': attempt, unit: n, 's': round(seconds, 2),
                   'per_s': round(n / seconds, 1), 'model_s': round(model_s, 2),
                   'model_per_s': round(n / model_s, 1)})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='1b')
  parser.add_argument('--examples', type=int, default=500)
  parser.add_argument('--gen', type=int, default=64)
  parser.add_argument('--max_gen_toks', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--lmjax_args', action='append', default=[],
                      help='more model_args for lmjax, e.g. attention=cudnn; repeat it to run lmjax once each')
  parser.add_argument('--device', default='cuda', help="the hf backend's torch device")
  parser.add_argument('--out', default='')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)  # 'backend|model_args|label'
  parser.add_argument('--dir', default='', help=argparse.SUPPRESS)
  a = parser.parse_args()
  if a.child:
    backend, model_args, label = a.child.split('|')
    rows = measure(backend, model_args, os.path.join(a.dir, 'tasks'), os.path.join(a.dir, 'ckpt'),
                   a.batch_size, a.device)
    with open(os.path.join(a.dir, 'rows.jsonl'), 'a') as f:
      f.writelines(json.dumps({**r, 'backend': label}) + '\n' for r in rows)
    return
  with tempfile.TemporaryDirectory() as tmp:
    include, ckpt = os.path.join(tmp, 'tasks'), os.path.join(tmp, 'ckpt')
    os.makedirs(include)
    write_tasks(include, a.examples, a.gen, a.max_gen_toks)
    write_checkpoint(ckpt, include, a.variant)
    runs = [('hf', f'pretrained={ckpt},dtype=bfloat16', 'hf')] + [
        ('lmjax', ','.join([f'hf={ckpt},dtype=bfloat16'] + ([extra] if extra else [])),
         f'lmjax[{extra}]' if extra else 'lmjax') for extra in a.lmjax_args or ['']]
    for backend, model_args, label in runs:
      done = subprocess.run([sys.executable, os.path.abspath(__file__), f'--child={backend}|{model_args}|{label}',
                             f'--dir={tmp}', f'--batch_size={a.batch_size}', f'--device={a.device}'])
      if done.returncode:
        print(json.dumps({'backend': label, 'failed': f'exit {done.returncode}'}), flush=True)
    with open(os.path.join(tmp, 'rows.jsonl')) as f:
      results = [json.loads(line) for line in f]
  by = {(r['backend'], r['task'], r['run']): r for r in results if 'task' in r}
  for label in sorted({r['backend'] for r in results} - {'hf'}):
    for task in (MC, GEN):
      for attempt in ('cold', 'warm'):
        ours, theirs = by[label, task, attempt], by['hf', task, attempt]
        print(f'{task} {attempt}: {label} / hf = {ours["per_s"] / theirs["per_s"]:.2f}x end to end, '
              f'{ours["model_per_s"] / theirs["model_per_s"]:.2f}x in the model\'s request methods')
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
