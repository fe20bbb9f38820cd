"""lm-evaluation-harness throughput: lmjax's adapter (model type 'lmjax') against the harness's own
Hugging Face backend ('hf', PyTorch), same checkpoint, same tasks, in one process.

  python benchmarks/harness_throughput.py --variant=1b --examples=500 --gen=64 --batch_size=32

The checkpoint: a `--variant` model with random weights, saved in Hugging Face format (bf16) by
lmjax.convert, with the parity tasks' 256-token tokenizer (tests/assets/harness/tokenizer; the ids
are a small corner of the model's vocabulary, which changes nothing of the cost). The tasks, written
to a temporary include path: a multiple-choice task of `--examples` examples x 4 choices (contexts of
~1,000 characters of the Python reference's topics, ~450 tokens; every request a loglikelihood), and a
generation task of `--gen` prompts of `--max_gen_toks` greedy tokens (a random model seldom stops
early; the tokens generated are counted). Each backend runs each task twice in one process: the
first (cold) includes lmjax's compiles, the second (warm) does not. Prints a JSON line per measurement
and the ratios lmjax / hf.
"""
import argparse
import json
import os
import random
import shutil
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


def write_checkpoint(directory: str, variant: str) -> None:
  from lmjax import config as config_lib, convert, model  # pylint: disable=import-outside-toplevel
  c = config_lib.base()
  c.model.variant = variant
  args = model.resolve(c.model)
  _, params = model.create(args, 0)
  convert.save(directory, args, params, dtype='bfloat16')
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(ROOT, 'tests', 'assets', 'harness', 'tokenizer', name), directory)


def run(backend: str, model_args: str, task: str, include: str, batch_size: int) -> tuple[float, dict]:
  import lm_eval  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  out = lm_eval.simple_evaluate(model=backend, model_args=model_args, tasks=[task], batch_size=batch_size,
                                task_manager=lm_eval.tasks.TaskManager(include_path=include),
                                log_samples=True, device='cuda' if backend == 'hf' else None)
  return time.perf_counter() - start, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='1b')
  parser.add_argument('--examples', type=int, default=500)
  parser.add_argument('--gen', type=int, default=64)
  parser.add_argument('--max_gen_toks', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--out', default='')
  a = parser.parse_args()
  import lmjax.eval.harness  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    include, ckpt = os.path.join(tmp, 'tasks'), os.path.join(tmp, 'ckpt')
    os.makedirs(include)
    write_tasks(include, a.examples, a.gen, a.max_gen_toks)
    write_checkpoint(ckpt, a.variant)
    backends = {'hf': f'pretrained={ckpt},dtype=bfloat16', 'lmjax': f'hf={ckpt},dtype=bfloat16'}
    for backend, model_args in backends.items():
      for task in (MC, GEN):
        for attempt in ('cold', 'warm'):
          seconds, out = run(backend, model_args, task, include, a.batch_size)
          samples = out['samples'][task]
          if task == MC:
            n = sum(len(s['resps']) for s in samples)
            row = dict(backend=backend, task=task, run=attempt, requests=n, s=round(seconds, 2),
                       per_s=round(n / seconds, 1))
          else:
            from lmjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
            tok = tokenizer_lib.load(ckpt)
            n = sum(len(tok.encode(s['resps'][0][0])) for s in samples)
            row = dict(backend=backend, task=task, run=attempt, generated_tokens=n, s=round(seconds, 2),
                       per_s=round(n / seconds, 1))
          print(json.dumps(row), flush=True)
          results.append(row)
  by = {(r['backend'], r['task'], r['run']): r['per_s'] for r in results}
  for task in (MC, GEN):
    for attempt in ('cold', 'warm'):
      print(f'{task} {attempt}: lmjax / hf = {by["lmjax", task, attempt] / by["hf", task, attempt]:.2f}x')
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
