"""The import rules of docs/ARCHITECTURE.md, read from every import in lmjax/ (function-level and
`__main__` ones included): imports point down the documented layers, and none go round in a circle."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def modules() -> dict[str, str]:
  """{dotted module name: path} of lmjax/ (a package by its own name)."""
  out = {}
  for directory, _, files in os.walk(os.path.join(ROOT, 'lmjax')):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        out[dotted.removesuffix('.__init__')] = path
  return out


def imports(path: str, name: str, known: dict[str, str]) -> set[str]:
  """The lmjax modules `path` (module `name`) imports: `from lmjax.x import y` is lmjax.x.y when that
  is a module, else lmjax.x; relative imports resolved."""
  package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      for a in node.names:
        found.add(f'{base}.{a.name}' if f'{base}.{a.name}' in known else base)
  return {m for m in found if m in known and m != name}


def layers() -> list[list[str]]:
  """The module prefixes of each layer, lowest first, from docs/ARCHITECTURE.md's table."""
  text = open(os.path.join(ROOT, 'docs', 'ARCHITECTURE.md'), encoding='utf-8').read()
  table = re.search(r'<!-- layers: top first -->\n(.*?)<!-- /layers -->', text, re.S).group(1)
  rows = [line.split('|')[2] for line in table.strip().splitlines()[2:]]
  return [[m.strip() for m in row.split(',')] for row in reversed(rows)]


def layer_of(module: str, table: list[list[str]]) -> int:
  """The layer of the longest prefix of `module` in the table."""
  best = max(((len(p), i) for i, prefixes in enumerate(table) for p in prefixes
              if module == p or module.startswith(p + '.')), default=None)
  assert best is not None, f'{module}: in no layer of docs/ARCHITECTURE.md'
  return best[1]


def graph() -> dict[str, set[str]]:
  known = modules()
  return {name: imports(path, name, known) for name, path in known.items()}


def test_imports_point_down_the_documented_layers():
  table = layers()
  assert len(table) == 6 and table[0] == ['lmjax'] and 'lmjax.cli' in table[4]
  up = {(a, b) for a, targets in graph().items() for b in targets
        if layer_of(b, table) > layer_of(a, table)}
  assert not up, f'imports up the layers: {sorted(up)}'


def test_the_trainer_and_the_step_builder_know_losses_by_their_record_only():
  """Distillation is a loss record (lmjax/distill/kd.py) found by name: neither the run layer nor the
  step builder imports anything from distill/."""
  g = graph()
  for module in ('lmjax.trainer', 'lmjax.steps', 'lmjax.config', 'lmjax.losses'):
    assert not {t for t in g[module] if t.startswith('lmjax.distill')}, module


def test_no_import_circles():
  g = graph()
  done, circles = set(), []

  def visit(module, path):
    for target in sorted(g[module]):
      if target in path:
        circles.append(path[path.index(target):] + [target])
      elif target not in done:
        visit(target, path + [target])
    done.add(module)

  for module in sorted(g):
    if module not in done:
      visit(module, [module])
  assert not circles, f'import circles: {circles}'


def test_the_checker_sees_a_function_level_import_and_an_upward_one(tmp_path):
  """The reader itself, on a module written here: a function-level import counts, a relative one
  resolves, and a parts module importing the trainer is reported as going up."""
  path = tmp_path / 'm.py'
  path.write_text('def f():\n  from lmjax import trainer\nfrom . import fs\n')
  known = modules()
  got = imports(str(path), 'lmjax.m', known)
  assert got == {'lmjax.trainer', 'lmjax.fs'}
  table = layers()
  assert layer_of('lmjax.trainer', table) > layer_of('lmjax.m', table)


def test_the_new_loss_example_trains_as_written(tmp_path, monkeypatch):
  """docs/ARCHITECTURE.md's "A new loss", its module as written: found by name, its field in the batch
  spec the step is compiled for, and the step's loss the digit-weighted CE of a float64 reference."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lmjax import batch as batch_lib, config as config_lib, model, sharding, steps as steps_lib  # pylint: disable=import-outside-toplevel
  text = open(os.path.join(ROOT, 'docs', 'ARCHITECTURE.md'), encoding='utf-8').read()
  code = re.search(r'<!-- new loss example -->\n```python\n(.*?)```', text, re.S).group(1)
  (tmp_path / 'digits_ce.py').write_text(code)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = config_lib.base()
  config.loss.name = 'digits_ce'
  config.model.compute_dtype = 'float32'
  config.train.update(batch_size=8, seq_len=32)
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  built = steps_lib.build(config, mesh, model.resolve(config.model).vocab_size)

  class Source:  # a data iterator with state, as the pipeline's
    def __init__(self):
      self.step = 0

    def __next__(self):
      self.step += 1
      return batch_lib.synthetic(8, 32, 64, seed=self.step, docs_per_row=2)  # ids < 64: digits are common

    def get_state(self):
      return {'step': self.step}

  data_iter = built.needs.wrap(Source(), None, 0)
  batch = next(data_iter)
  assert data_iter.get_state() == {'step': 1}
  batch_lib.check(batch, 8, 32, built.needs.batch_fields)
  abstract = batch_lib.abstract(8, 32, extra=built.needs.batch_fields)
  assert abstract["boost"].shape == (8, 32) and 2.0 in batch['boost'] and 1.0 in batch['boost']
  state = built.init(0)
  params = jax.device_get(state['params'])
  with jax.set_mesh(mesh):
    _, metrics = built.train_step(state, sharding.global_batch(batch, mesh))
  z = np.asarray(model.apply(built.graphdef, params, batch), np.float64)
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  ce = lse - np.take_along_axis(z, batch['targets'][..., None], -1)[..., 0]
  want = np.sum(batch['weights'] * batch['boost'] * ce) / np.sum(batch['weights'])
  np.testing.assert_allclose(float(metrics['loss']), want, rtol=1e-5)


def test_a_plugin_loss_block_is_checked_like_the_base_config(tmp_path, monkeypatch):
  """A loss module with settings: its block (config.loss.<last part of its name>) validates against
  its `defaults`, so a typo in it is named like any other unknown field."""
  import pytest  # pylint: disable=import-outside-toplevel
  from lmjax import config as config_lib, errors  # pylint: disable=import-outside-toplevel
  pkg = tmp_path / 'mypkg'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('')
  (pkg / 'scaled_ce.py').write_text(
      'import ml_collections\nfrom lmjax import losses\n\n'
      'def defaults():\n  return ml_collections.ConfigDict(dict(factor=2.0))\n\n'
      'RECORD = losses.Record(\n'
      '    implementations={"materialize": lambda x, w, b, a: 2.0 * losses.ce_materialize(x, w, b, a)},\n'
      '    defaults=defaults)\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  import mypkg.scaled_ce as plugin  # pylint: disable=import-outside-toplevel
  config = config_lib.base()
  config.loss.name = 'mypkg.scaled_ce'
  config.loss.scaled_ce = plugin.defaults()
  config_lib.validate(config)
  config.loss.scaled_ce.factr = 3.0
  with pytest.raises(errors.ConfigError, match=r'config\.loss\.scaled_ce\.factr: no such field \(did you mean '
                     r'config\.loss\.scaled_ce\.factor\?\)'):
    config_lib.validate(config)
  config.loss.name = 'mypkg.no_such_loss'
  with pytest.raises(errors.ConfigError, match=r"config\.loss\.name='mypkg\.no_such_loss': no module"):
    config_lib.validate(config)
