"""Golden outputs of lm-evaluation-harness's own Hugging Face backend, for the lmjax adapter's parity
test (tests/test_harness.py, which needs neither torch nor transformers).

  python scripts/make_harness_golden.py            # in a venv with torch, transformers, lm-eval[hf]

Writes under tests/assets/harness/:
  tasks/{mc,ppl,gen}.jsonl   the parity tasks' data (the YAMLs and utils.py beside them are written
                             by hand): 12 legal cloze examples (multiple choice), 6 documents of the
                             Python reference's topics cut to 1,500 characters (rolling perplexity,
                             several windows each), 8 arithmetic questions (greedy generation)
  tokenizer/                 a 256-token BPE tokenizer trained here on the tasks' text (tokenizer.json,
                             tokenizer_config.json: BOS first, as lmjax trains) for the model
                             tests/assets/hf/llama_tied (random weights, vocabulary 256, 256 positions);
                             `model_dir` puts the two in one directory, as the test does
  golden.json                the `hf` backend's per-request results (log-likelihoods with greedy flags,
                             rolling log-likelihoods, generated strings) and each task's metrics,
                             with the versions that made them
"""
import argparse
import json
import os
import platform
import random
import shutil
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, 'tests', 'assets', 'harness')
TASKS = ('lmjax_parity_mc', 'lmjax_parity_ppl', 'lmjax_parity_gen')
SPECIALS = ['<unk>', '<s>', '</s>']  # ids 0, 1, 2: the checkpoint's pad, bos and eos


def write_data(tasks_dir: str) -> list[str]:
  """The three tasks' jsonl files; returns all their text (the tokenizer's training set)."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  with open(os.path.join(ROOT, 'lmjax', 'eval', 'tasks', 'legal_cloze.jsonl'), encoding='utf-8') as f:
    mc = [json.loads(line) for line in f][:12]
  ppl = [{'text': topics.topics[k][:1500]} for k in sorted(topics.topics)[:6]]
  rng = random.Random(0)
  gen = []
  for _ in range(8):
    a, b = rng.randrange(10, 50), rng.randrange(10, 50)
    gen.append({'question': f'What is {a} + {b}?', 'answer': str(a + b)})
  for name, rows in (('mc', mc), ('ppl', ppl), ('gen', gen)):
    with open(os.path.join(tasks_dir, f'{name}.jsonl'), 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
  return ([ex['context'] + c for ex in mc for c in ex['choices']] + [r['text'] for r in ppl]
          + [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in gen])


def write_tokenizer(tokenizer_dir: str, texts: list[str]) -> None:
  """A 256-token BPE tokenizer (Metaspace; the tasks' characters are its alphabet) that puts <s>
  before a text when asked for special tokens, for llama_tied's vocabulary of 256."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # pylint: disable=import-outside-toplevel
  os.makedirs(tokenizer_dir, exist_ok=True)
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=256, special_tokens=SPECIALS,
                                                     show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                     special_tokens=[('<s>', 1)])
  assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2] and tok.get_vocab_size() <= 256
  tok.save(os.path.join(tokenizer_dir, 'tokenizer.json'))
  with open(os.path.join(tokenizer_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'unk_token': '<unk>', 'bos_token': '<s>',
               'eos_token': '</s>', 'pad_token': '<unk>', 'model_max_length': 256}, f, indent=2)


def model_dir(out: str) -> str:
  """`out` holding llama_tied's config and weights with the parity tokenizer."""
  os.makedirs(out, exist_ok=True)
  for name in ('config.json', 'model.safetensors'):
    shutil.copy(os.path.join(ROOT, 'tests', 'assets', 'hf', 'llama_tied', name), out)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(ASSETS, 'tokenizer', name), out)
  return out


def hf_results(model_dir: str, tasks_dir: str, batch_size: int) -> dict:
  import lm_eval  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  out = lm_eval.simple_evaluate(
      model='hf', model_args=f'pretrained={model_dir},dtype=float32', tasks=list(TASKS),
      task_manager=lm_eval.tasks.TaskManager(include_path=tasks_dir), batch_size=batch_size,
      device='cpu', log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
  golden = {'versions': {'lm_eval': lm_eval.__version__, 'torch': torch.__version__,
                         'transformers': transformers.__version__, 'python': platform.python_version()},
            'batch_size': batch_size, 'metrics': {}, 'requests': {}}
  for task in TASKS:
    golden['metrics'][task] = {k.split(',')[0]: v for k, v in out['results'][task].items()
                               if k.endswith(',none') and '_stderr' not in k}
    golden['requests'][task] = [s['resps'] for s in sorted(out['samples'][task], key=lambda s: s['doc_id'])]
  return golden


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=4)
  a = parser.parse_args()
  tasks_dir = os.path.join(ASSETS, 'tasks')
  write_tokenizer(os.path.join(ASSETS, 'tokenizer'), write_data(tasks_dir))
  with tempfile.TemporaryDirectory() as tmp:
    golden = hf_results(model_dir(tmp), tasks_dir, a.batch_size)
  with open(os.path.join(ASSETS, 'golden.json'), 'w') as f:
    json.dump(golden, f, indent=1)
  print(json.dumps(golden['metrics'], indent=1))


if __name__ == '__main__':
  main()
