"""EleutherAI's lm-evaluation-harness on lmjax models: the harness's model type `lmjax`.

  import lm_eval, lmjax.eval.harness
  lm_eval.simple_evaluate(model='lmjax', model_args='workdir=RUN[,checkpoint=STEP]', tasks=[...])
  lm_eval.simple_evaluate(model='lmjax', model_args='hf=DIR', tasks=[...])   # a Hugging Face checkpoint
  lm_eval.simple_evaluate(model='lmjax', model_args='hf=meta-llama/Llama-3.2-1B', tasks=[...])  # by Hub id

`LmjaxLM` is a `TemplateLM`: the harness tokenizes (`tok_encode`) and splits each request's context
and continuation; this module scores token ids the way the harness's own Hugging Face backend
(`lm_eval/models/huggingface.py`) does, so the numbers are the ones papers report:

- loglikelihood: a row is (context + continuation) cut from the left to max_length + 1 tokens; the
  sum of the continuation's log-probabilities and whether each of its tokens is the argmax (the
  greedy flag), by `choice.score_pairs`, the scorer of lmjax's own jsonl tasks too. Requests run
  longest first (the harness's Collator), in batches of `batch_size` rows, each as wide as its longest
  row needs (`choice.row_width`: a few compiled shapes per task).
- loglikelihood_rolling: a document's tokens in disjoint windows of max_length (`get_rolling_token_
  windows`, context 1), each scored as a loglikelihood request, summed.
- generate_until: `lmjax/decode.py`'s KV-cache decoding (greedy, or sampled with `temperature`),
  `max_gen_toks` new tokens after the context cut from the left to max_length - max_gen_toks, stopped
  at EOS, the text cut at the first stop string.

Tokens: lmjax trains every document after BOS, so for a run `tok_encode` puts BOS first (as a Llama
tokenizer does) unless asked not to; a Hugging Face checkpoint's as its tokenizer does when asked for
special tokens (the hf backend's default). BOS is the harness's prefix for an empty context. A run directory's
model, tokenizer and mesh are the run's (its config.json, provenance.json; lmjax/eval/runs.py); a
Hugging Face directory's are its safetensors and tokenizer.json (lmjax/convert.py), on a data-parallel
mesh over every device. Rows are split over the mesh's data shards and, across processes, each
process feeds its slice and every process gathers the scores (as the training step does).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from lmjax import errors

errors.require('lm_eval', 'eval', 'lm-evaluation-harness tasks (lmjax.eval.harness)')
# pylint: disable=g-import-not-at-top,wrong-import-position
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, \
    postprocess_generated_text

from lmjax import config as config_lib, convert, decode, losses, model, sharding
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.eval import choice
# pylint: enable=g-import-not-at-top,wrong-import-position

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tasks')  # the shipped local tasks


class Scorer:
  """A model's graph, params, tokenizer, mesh and scoring loss, `batch_size` rows at a time."""

  def __init__(self, graphdef, params: dict, tokenizer: tokenizer_lib.Tokenizer,
               mesh: jax.sharding.Mesh, loss_args: losses.Args, max_length: int, batch_size: int,
               add_bos: bool = True):
    data_shards = mesh.shape['data'] * mesh.shape.get('fsdp', 1)
    self.graphdef, self.params, self.tokenizer, self.mesh = graphdef, params, tokenizer, mesh
    self.loss_args, self.max_length = loss_args, max_length
    self.add_bos = add_bos  # put BOS before a text: lmjax runs always, a checkpoint as its tokenizer does
    self.batch_size = -(-batch_size // data_shards) * data_shards  # rows split evenly over shards

  def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each (context ids, continuation ids), in the given order
    (choice.score_pairs: a pair longer than max_length + 1 tokens loses the start of its context)."""
    return choice.score_pairs(self.graphdef, self.params, self.mesh, self.loss_args, pairs,
                              self.max_length, self.batch_size)

  def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
               seed: int) -> list[list[int]]:
    """Up to `max_new_tokens` new tokens after each prompt, cut at EOS or at a padding row of the
    model's vocabulary (past the tokenizer's: no text, as `python -m lmjax.sample` stops there).

    decode.generate compiles per prompt shape, so the batch always has batch_size + 1 rows: filler
    rows of BOS fill it, the last as long as `choice.row_width` of the longest prompt (a few widths
    per task); a row's tokens do not depend on the others (decode.py)."""
    width = choice.row_width(max(map(len, prompts)), self.max_length - max_new_tokens)
    filler = [self.tokenizer.bos_id] * width
    rows = list(prompts) + [filler] * (self.batch_size + 1 - len(prompts))
    new = decode.generate(self.graphdef, self.params, rows, max_new_tokens, temperature=temperature,
                          seed=seed, eos_id=self.tokenizer.eos_id)[:len(prompts)]
    return [decode.text_tokens(row, self.tokenizer.eos_id, self.tokenizer.vocab_size)
            for row in np.asarray(new).tolist()]


def run_scorer(workdir: str, checkpoint: int | None, batch_size: int) -> Scorer:
  """The Scorer of checkpoint `checkpoint` (None: the latest) of the lmjax run in `workdir`: its
  model, mesh, tokenizer and config.loss.implementation, scoring over the tokenizer's vocabulary."""
  from lmjax.eval import runs  # pylint: disable=import-outside-toplevel  (the data pipeline's imports)
  ev = runs.build(config_lib.from_run(workdir), workdir, data=False)
  _, params = runs.load_params(ev, workdir, checkpoint)
  return evaluator_scorer(ev, params, batch_size)


def evaluator_scorer(ev, params: dict, batch_size: int | None = None) -> Scorer:
  """The Scorer of a run's Evaluator (lmjax/eval/heldout.py) and `params`: its model, mesh,
  tokenizer, config.train.seq_len, `batch_size` rows (default config.train.batch_size) and
  `choice.scoring_loss`."""
  return Scorer(ev.steps.graphdef, params, ev.tokenizer, ev.mesh, choice.scoring_loss(ev),
                ev.config.train.seq_len, batch_size or ev.config.train.batch_size)


def hf_scorer(directory: str, batch_size: int, max_length: int | None, dtype: str | None,
              attention: str = 'xla') -> Scorer:
  """The Scorer of a Hugging Face checkpoint directory (safetensors, config.json, tokenizer.json) or
  Hub id, with its parameters in and computing in `dtype` (None: the checkpoint's own, its
  config.json's dtype or torch_dtype), attention by `attention` (config.model.attention's choices),
  scoring over the whole vocabulary, as transformers does."""
  if attention not in model.ATTENTION:
    raise errors.ConfigError(f'lmjax model_args attention={attention!r}: expected one of {model.ATTENTION}')
  directory = convert.directory(directory)
  cfg = convert.read_config(directory)
  dtype = dtype or cfg.get('dtype') or cfg.get('torch_dtype') or 'float32'
  mesh = sharding.make_mesh(config_lib.base().mesh)  # data parallel over every device
  args, params = convert.load(directory, mesh, compute_dtype=dtype, param_dtype=dtype, attention=attention)
  length = max_length or cfg.get('max_position_embeddings')
  if not length:
    raise errors.ConfigError(f'{directory}/config.json has no max_position_embeddings: pass max_length=')
  defaults = losses.defaults()
  loss_args = losses.Args('ce', 'chunked', 0.0, int(defaults.chunk_tokens), args.vocab_size)
  tok = tokenizer_lib.load(directory)
  return Scorer(model.abstract(args)[0], params, tok, mesh, loss_args, int(length), batch_size,
                add_bos=tok.adds_bos)  # a directory's tokenizer.json (tokenizer_lib.load)


@register_model('lmjax')
class LmjaxLM(TemplateLM):
  """The harness's model type `lmjax`: model_args `workdir=RUN[,checkpoint=STEP]` or
  `hf=DIR[,dtype=D][,attention=A]` (D: the dtype, default the checkpoint's; A: config.model.attention's
  choices, default xla), with `batch_size` (rows per forward pass),
  `max_length` (default: the run's seq_len, the checkpoint's max_position_embeddings), `max_gen_toks`
  (default 256) and `seed` (sampled generation)."""

  def __init__(self, workdir: str | None = None, checkpoint: int | None = None, hf: str | None = None,
               batch_size: int | str = 16, max_length: int | None = None, max_gen_toks: int = 256,
               seed: int = 0, dtype: str | None = None, attention: str = 'xla',
               scorer: Scorer | None = None, **unused):
    del unused  # what simple_evaluate passes every model (device, max_batch_size)
    super().__init__()
    if sum(x is not None for x in (workdir, hf, scorer)) != 1:
      raise errors.ConfigError("lmjax model_args: expected workdir=RUN[,checkpoint=STEP] or hf=DIR")
    batch_size = 16 if batch_size in (None, 'auto') else int(batch_size)
    if scorer is None:
      scorer = (run_scorer(workdir, None if checkpoint is None else int(checkpoint), batch_size)
                if workdir else hf_scorer(hf, batch_size, max_length and int(max_length), dtype, attention))
    self.scorer = scorer
    if max_length and workdir:
      self.scorer.max_length = int(max_length)
    self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)

  @property
  def tokenizer_name(self) -> str:
    return os.path.basename(self.scorer.tokenizer.path)

  @property
  def eot_token_id(self) -> int:
    return self.scorer.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.scorer.tokenizer.bos_id

  @property
  def max_length(self) -> int:
    return self.scorer.max_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    ids = self.scorer.tokenizer.encode(string)
    bos = self.scorer.add_bos if add_special_tokens is None else add_special_tokens
    return [self.prefix_token_id] + ids if bos else ids

  def tok_decode(self, ids: list[int]) -> str:
    return self.scorer.tokenizer.decode(ids)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    order = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))
    ordered = list(order.get_batched(n=0))[0] if requests else []
    scored = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in ordered])
    for (key, _, _), result in zip(ordered, scored):
      if key is not None:  # a rolling window has none
        self.cache_hook.add_partial('loglikelihood', key, result)
    return order.get_original(scored)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
      totals[i] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    eos = self.scorer.tokenizer.decode([self.eot_token_id])
    order = Collator([req.args for req in requests], sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
                     group_by='gen_kwargs', group_fn=lambda x: x[1])
    out = []
    for chunk in order.get_batched(n=self.scorer.batch_size):
      contexts, all_kwargs = zip(*chunk)
      kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop('until', None), eos=eos)
      max_new = kwargs.pop('max_gen_toks')
      if max_new >= self.max_length:
        raise errors.ConfigError(f'max_gen_toks={max_new}: expected fewer than max_length={self.max_length}')
      prompts = [self.tok_encode(c)[-(self.max_length - max_new):] for c in contexts]
      new = self.scorer.generate(prompts, max_new, float(kwargs.get('temperature') or 0.0), self.seed)
      for context, gen_kwargs, ids in zip(contexts, all_kwargs, new):
        text = postprocess_generated_text(self.tok_decode(ids), stop=until, think_end_token=None)
        out.append(text)
        self.cache_hook.add_partial('generate_until', (context, gen_kwargs), text)
    return order.get_original(out)


HELDOUT = 'lmjax_heldout'  # a run's held-out documents, a rolling-perplexity task per source


def heldout_tasks(config, workdir: str) -> list[dict]:
  """Task configs `lmjax_heldout_<source>`, one per source of the run of `config` in `workdir`: its
  held-out documents (those of the trainer's eval/<source>/loss, each whole: prepare.cleaned_documents)
  scored in rolling windows (word and byte perplexity, bits per byte). The harness's windows predict
  the document's tokens after BOS as its hf backend does (with BOS itself, given BOS, as the first)."""
  from lmjax.data import prepare  # pylint: disable=import-outside-toplevel
  import datasets  # pylint: disable=import-outside-toplevel  (lm-eval's own requirement)
  present, _ = prepare.available_sources(config.data)
  tasks = []
  for source in present:
    docs = prepare.cleaned_documents(config.data, workdir, source)['eval']
    rows = [{'text': d} for d in docs]
    tasks.append({
        'task': f'{HELDOUT}_{source}', 'test_split': 'test', 'output_type': 'loglikelihood_rolling',
        'custom_dataset': lambda rows=rows, **_: datasets.DatasetDict(
            {'test': datasets.Dataset.from_list(rows)}),
        'doc_to_text': '', 'doc_to_target': '{{text}}',
        'metric_list': [{'metric': m} for m in ('word_perplexity', 'byte_perplexity', 'bits_per_byte')]})
  return tasks


def task_manager(tasks: list, include_path: str | None):
  """The harness's TaskManager over its own tasks, lmjax/eval/tasks/ and `include_path`; a task name
  none of them has is an error naming it (task configs, dicts, are the harness's to check)."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  manager = TaskManager(include_path=[TASKS_DIR] + ([include_path] if include_path else []))
  unknown = [t for t in tasks if isinstance(t, str) and t != HELDOUT and t not in manager.all_tasks]
  if unknown:
    raise errors.ConfigError(f'harness tasks {unknown}: not tasks of lm-eval {lm_eval.__version__}, of '
                             f'lmjax/eval/tasks or of the include path {include_path!r}')
  return manager


def evaluate(scorer: Scorer, tasks: list[str], num_fewshot: int | None = None,
             include_path: str | None = None, limit: float | None = None,
             run: tuple | None = None, manager=None) -> tuple[dict[str, float], str]:
  """The harness's `tasks` (its own names, lmjax's local tasks in lmjax/eval/tasks/, those of task
  YAMLs under `include_path`, or `lmjax_heldout`: the held-out documents of `run` = (config,
  workdir), `heldout_tasks`) on `scorer`'s model: ({'harness/<task>/<metric>': value}, the
  harness's results table). Task data comes from the Hugging Face Hub unless it is local
  (HF_DATASETS_OFFLINE=1 for the cache only). `manager`: `task_manager(tasks, include_path)`'s, when
  the caller keeps one (its index of the harness's task library takes seconds to build)."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  manager = manager or task_manager(tasks, include_path)
  if HELDOUT in tasks:
    if run is None:
      raise errors.ConfigError(f'harness task {HELDOUT}: a run\'s held-out documents; evaluate a run')
    tasks = [t for t in tasks if t != HELDOUT] + heldout_tasks(*run)
  out = lm_eval.simple_evaluate(model=LmjaxLM(scorer=scorer), tasks=list(tasks), num_fewshot=num_fewshot,
                                limit=limit, task_manager=manager)
  metrics = {}
  for task, values in out['results'].items():
    for key, value in values.items():  # 'acc,none': a metric and its filter (not 'sample_len')
      name, comma, filtered = key.partition(',')
      if comma and isinstance(value, (int, float)) and not name.endswith('_stderr'):
        suffix = '' if filtered == 'none' else f'/{filtered}'  # gsm8k: strict-match, flexible-extract
        metrics[f'harness/{task}/{name}{suffix}'] = float(value)
  return metrics, lm_utils.make_table(out)
