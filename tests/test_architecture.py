"""The import rules of docs/ARCHITECTURE.md, read from every import in lmjax/ (function-level and
`__main__` ones included): imports point down the documented layers, and none go round in a circle."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The one import the layering names as not yet fixed (docs/ARCHITECTURE.md, issue 27).
KNOWN = {('lmjax.trainer', 'lmjax.distill.store'), ('lmjax.trainer', 'lmjax.distill.teacher')}


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
  assert up == KNOWN, f'imports up the layers: {sorted(up - KNOWN)}; fixed: {sorted(KNOWN - up)}'


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
