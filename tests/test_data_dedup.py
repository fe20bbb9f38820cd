"""Dedup: shingles against a Python reference, the estimator against exact Jaccard, recall and false
positives on a planted set, agreement with datasketch's MinHashLSH, union-find, exact dedup."""
import hashlib
import itertools
import random

import numpy as np
import pytest

from lmjax import errors
from lmjax.data import dedup
from lmjax.data.records import Doc

CFG = dedup.defaults()


def _vocab(rng, n=4000):
  return [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(3, 9)))
          for _ in range(n)]


def _shingles(words, n=5):
  """The reference: word n-gram tuples (one tuple of all words when there are fewer than n)."""
  if len(words) < n:
    return {tuple(words)} if words else set()
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a, b):
  return len(a & b) / len(a | b)


def test_shingles_are_word_5grams_and_char_5grams_in_chinese():
  rng = random.Random(0)
  vocab = _vocab(rng)
  texts = [' '.join(rng.choices(vocab, k=rng.randint(0, 40))) for _ in range(100)]
  hashes, offsets = dedup.shingle_hashes(texts, CFG)
  for i, t in enumerate(texts):
    assert len(set(hashes[offsets[i]:offsets[i + 1]].tolist())) == len(_shingles(t.split()))
  # Case, punctuation and spacing are not part of a word; a CJK document is cut into characters:
  # 我们用 J A X 训练模型 效果很好 = 14 word characters -> 10 character 5-grams.
  variants = ['Alpha beta, gamma delta epsilon zeta!', 'alpha  BETA gamma\ndelta (epsilon) zeta',
              '我们用JAX训练模型，效果很好。']
  hashes, offsets = dedup.shingle_hashes(variants, CFG)
  sets = [set(hashes[offsets[i]:offsets[i + 1]].tolist()) for i in range(3)]
  assert sets[0] == sets[1] and len(sets[0]) == 2
  assert len(sets[2]) == 10


def test_documents_without_words_have_no_shingles_and_no_pairs():
  texts = ['', '... !!! ...', 'one', '... !!! ...']
  hashes, offsets = dedup.shingle_hashes(texts, CFG)
  assert np.diff(offsets).tolist() == [0, 0, 1, 0]
  sigs = dedup.signatures(texts, CFG)
  assert dedup.has_shingles(sigs).tolist() == [False, False, True, False]
  assert dedup.duplicate_pairs(list(range(4)), sigs, CFG) == set()
  assert dedup.signatures([], CFG).shape == (0, CFG.num_perm)


def test_signatures_do_not_depend_on_batching():
  rng = random.Random(1)
  vocab = _vocab(rng)
  texts = [' '.join(rng.choices(vocab, k=rng.randint(1, 3000))) for _ in range(60)] + ['我们用JAX']
  together = dedup.signatures(texts, CFG)
  one_by_one = np.concatenate([dedup.signatures([t], CFG) for t in texts])
  np.testing.assert_array_equal(together, one_by_one)


@pytest.mark.parametrize('common,different', [(20, 2), (200, 20), (300, 100), (50, 50)])
def test_estimator_is_unbiased_with_about_binomial_variance(common, different):
  """Sets of random shingle hashes with known Jaccard J: the fraction of equal signature entries
  estimates J without bias, with close to the variance J(1-J)/num_perm of classic MinHash."""
  rng = np.random.default_rng(common)
  errors = []
  for _ in range(300):
    values = rng.integers(0, 2**64 - 1, size=common + 2 * different, dtype=np.uint64)
    a = values[:common + different]
    b = np.concatenate([values[:common], values[common + different:]])
    sig = dedup.minhash(np.concatenate([a, b]), np.array([0, len(a), len(a) + len(b)]), CFG)
    errors.append((sig[0] == sig[1]).mean() - common / (common + 2 * different))
  j = common / (common + 2 * different)
  binomial = j * (1 - j) / CFG.num_perm
  assert abs(np.mean(errors)) < 3 * np.sqrt(binomial / 300) + 0.002
  assert 0.6 < np.var(errors) / binomial < 1.5


def _planted(seed=0):
  """Families of a base document and copies with k words replaced: (texts, family of each text)."""
  rng = random.Random(seed)
  vocab = _vocab(rng)
  texts, family = [], []
  for f in range(120):
    length, edits = (300, (1, 2, 4, 6, 10, 15, 25, 40)) if f % 3 else (100, (1, 2, 3, 5, 8, 15))
    base = rng.choices(vocab, k=length)
    for k in (0,) + edits:
      words = list(base)
      for i in rng.sample(range(length), k):
        words[i] = rng.choice(vocab)
      texts.append(' '.join(words))
      family.append(f)
  return texts, family


@pytest.fixture(scope='module')
def planted():
  texts, family = _planted()
  shingles = [_shingles(t.split()) for t in texts]
  sigs = dedup.signatures(texts, CFG)
  pairs = dedup.duplicate_pairs(list(range(len(texts))), sigs, CFG)
  truth = {}
  for i, j in itertools.combinations(range(len(texts)), 2):
    if family[i] == family[j]:
      truth[(i, j)] = _jaccard(shingles[i], shingles[j])
  return texts, family, shingles, {tuple(sorted(p)) for p in pairs}, truth


def test_planted_recall_and_false_positive_rate_with_default_settings(planted):
  texts, family, _, pairs, truth = planted
  high = [p for p, j in truth.items() if j >= 0.85]
  low = [p for p, j in truth.items() if j <= 0.5]
  assert len(high) > 400 and len(low) > 1000  # enough pairs for the rates to mean something
  recall = sum(p in pairs for p in high) / len(high)
  false_positive = sum(p in pairs for p in low) / len(low)
  assert recall >= 0.95, recall
  assert false_positive <= 0.01, false_positive
  assert all(family[i] == family[j] for i, j in pairs)  # unrelated documents (J ~ 0) never pair


def _datasketch_pairs(shingles):
  """Pairs by datasketch's MinHash and MinHashLSH with our settings and verification rule."""
  datasketch = pytest.importorskip('datasketch')
  lsh = datasketch.MinHashLSH(threshold=CFG.threshold, num_perm=CFG.num_perm,
                              params=(CFG.bands, CFG.rows))
  sketches = []
  for i, s in enumerate(shingles):
    m = datasketch.MinHash(num_perm=CFG.num_perm, seed=1)
    m.update_batch([' '.join(x).encode() for x in s])
    lsh.insert(i, m)
    sketches.append(m)
  pairs = set()
  for i, m in enumerate(sketches):
    pairs |= {tuple(sorted((i, j))) for j in lsh.query(m)
              if j != i and m.jaccard(sketches[j]) >= CFG.threshold}
  return pairs


def test_pairs_agree_with_datasketch_minhash_lsh():
  """Pairs planted with Jaccard >= 0.85 or <= 0.55 (away from the 0.75 threshold, where two
  independent estimators agree only by chance): both find the same pairs."""
  rng = random.Random(5)
  vocab = _vocab(rng)
  texts = []
  for f in range(400):
    base = rng.choices(vocab, k=200)
    words = list(base)
    for i in rng.sample(range(200), rng.choice((1, 2, 3) if f % 2 else (20, 30, 50))):
      words[i] = rng.choice(vocab)
    texts += [' '.join(base), ' '.join(words)]
  shingles = [_shingles(t.split()) for t in texts]
  truth = [_jaccard(shingles[i], shingles[i + 1]) for i in range(0, len(texts), 2)]
  assert all(j >= 0.85 or j <= 0.55 for j in truth) and sum(j >= 0.85 for j in truth) == 200
  ours = {tuple(sorted(p)) for p in dedup.duplicate_pairs(
      list(range(len(texts))), dedup.signatures(texts, CFG), CFG)}
  theirs = _datasketch_pairs(shingles)
  agreement = len(ours & theirs) / len(ours | theirs)
  assert agreement >= 0.95, (agreement, len(ours), len(theirs))


def test_disagreements_with_datasketch_lie_near_the_threshold(planted):
  """On the planted families (similarities spread from 0.1 to 1) the two differ only on pairs
  whose true Jaccard is within 0.15 of the 0.75 threshold."""
  _, _, shingles, pairs, truth = planted
  theirs = _datasketch_pairs(shingles)
  differ = (pairs ^ theirs)
  assert all(0.6 < truth[p] < 0.9 for p in differ)
  assert len(differ) < 0.5 * len(pairs)


def test_bucket_pairs_verify_and_cap_large_buckets():
  sig = np.arange(112, dtype=np.uint32)[None]
  other = sig.copy()
  other[0, :40] += 1000  # agrees in 72/112 = 0.64 < 0.75
  near = sig.copy()
  near[0, :20] += 2000  # agrees with a in 92/112 = 0.82, with b in 72/112
  sigs = np.concatenate([sig, other, near])
  assert list(dedup.bucket_pairs(['a', 'b', 'c'], sigs, CFG)) == [('c', 'a')]
  cfg = dedup.defaults()
  cfg.max_bucket = 1
  big = np.repeat(sig, 5, axis=0)
  assert sorted(dedup.bucket_pairs(list('vwxyz'), big, cfg)) == [('w', 'v'), ('x', 'v'), ('y', 'v'),
                                                                  ('z', 'v')]


def test_clusters_are_connected_components_rooted_at_the_smallest_key():
  roots = dedup.clusters([('c', 'a'), ('d', 'e'), ('b', 'c'), ('z', 'y'), ('e', 'b')])
  assert roots == {'a': 'a', 'b': 'a', 'c': 'a', 'd': 'a', 'e': 'a', 'y': 'y', 'z': 'y'}
  assert dedup.clusters([]) == {}


def test_hash_to_min_finds_the_union_find_components_in_logarithmic_rounds():
  """Hash-to-Min (the Beam runner's clusters) against union-find (scipy's connected components as
  the oracle) on random graphs and on shuffled paths, the slowest case: a path of n nodes takes
  about log2(n) rounds."""
  import scipy.sparse  # pylint: disable=import-outside-toplevel
  import scipy.sparse.csgraph  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  graphs = [[tuple(int(x) for x in rng.integers(0, n, 2)) for _ in range(e)]
            for n, e in ((40, 30), (600, 500), (3000, 2500))]
  paths = []
  for n in (64, 1024):
    perm = [int(x) for x in rng.permutation(n)]
    paths.append(list(zip(perm[:-1], perm[1:])))
  for pairs in graphs + paths:
    nodes = sorted({x for p in pairs for x in p})
    at = {x: i for i, x in enumerate(nodes)}
    graph = scipy.sparse.coo_matrix((np.ones(len(pairs)), ([at[a] for a, _ in pairs],
                                                           [at[b] for _, b in pairs])),
                                    shape=(len(nodes), len(nodes)))
    _, label = scipy.sparse.csgraph.connected_components(graph, directed=False)
    smallest = {}
    for x in nodes:
      smallest.setdefault(label[at[x]], x)  # nodes are sorted: the first seen is the smallest
    roots, rounds = dedup.components(pairs, rounds=40)
    assert roots == {x: smallest[label[at[x]]] for x in nodes} == dedup.clusters(pairs)
    assert rounds <= 2 * np.log2(len(nodes)) + 4
  with pytest.raises(errors.ConfigError, match='in the last of 3 Hash-to-Min rounds'):
    dedup.components(paths[-1], rounds=3)


def test_near_dedup_keeps_one_per_cluster_whatever_the_order(planted):
  texts, family, *_ = planted
  docs = [Doc('s', f'{i}', t) for i, t in enumerate(texts)]
  kept, drops = dedup.dedup(docs, CFG)
  shuffled = list(docs)
  random.Random(3).shuffle(shuffled)
  kept2, _ = dedup.dedup(shuffled, CFG)
  assert {d.doc_id for d in kept} == {d.doc_id for d in kept2}
  assert len(kept) + len(drops) == len(docs)
  assert {d.reason for d in drops} == {'near_duplicate'}
  assert len({family[int(d.doc_id)] for d in kept}) == max(family) + 1  # every family keeps one


def test_exact_dedup_keeps_the_copy_with_the_smallest_id_hash_across_sources():
  docs = [Doc('web', 'b', 'same text\n'), Doc('books', 'z', 'same text\n'),
          Doc('web', 'a', 'other\n'), Doc('web', 'c', 'same text\n')]
  kept, drops = dedup.dedup(docs, CFG)
  id_hash = lambda d: hashlib.blake2b(f'{d.source}\0{d.doc_id}'.encode(), digest_size=8).digest()
  first = min(docs[:2] + docs[3:], key=id_hash)
  assert kept == [d for d in docs if d in (first, docs[2])]
  assert sorted((d.source, d.doc_id, d.stage, d.reason) for d in drops) == sorted(
      (d.source, d.doc_id, 'dedup', 'exact_duplicate') for d in docs if d not in (first, docs[2]))
  # The streaming form (key rows) keeps the same copy.
  keys = dedup.key_rows(docs)
  assert dedup.exact_rows(keys).tolist() == [docs.index(first)] * 2 + [2, docs.index(first)]
  cfg = dedup.defaults()
  cfg.exact = False  # then the copies are near-duplicates (estimated Jaccard 1)
  kept, drops = dedup.dedup(docs, cfg)
  assert len(kept) == 2 and {d.reason for d in drops} == {'near_duplicate'}


def test_band_settings_are_checked():
  cfg = dedup.defaults()
  cfg.bands = 15
  with pytest.raises(ValueError, match='bands \\* rows'):
    dedup.band_hashes(np.zeros((2, cfg.num_perm), np.uint32), cfg)


def test_streaming_dedup_equals_in_memory_dedup(planted, tmp_path):
  """dedup.duplicate_rows (signatures spilled to a file, one band in memory) drops exactly what
  dedup.dedup drops, with the same kept document per cluster; also for a bucket larger than
  max_bucket."""
  texts, *_ = planted
  docs = [Doc('s', f'{i}', t) for i, t in enumerate(texts)] + [Doc('t', '0', texts[0])]
  for max_bucket in (200, 2):
    cfg = dedup.defaults()
    cfg.max_bucket = max_bucket
    kept, drops = dedup.dedup(docs, cfg)
    keys = dedup.key_rows(docs)
    sig_path = str(tmp_path / 'sigs.bin')
    dedup.signatures([d.text for d in docs], cfg).tofile(sig_path)
    kept_row, exact = dedup.duplicate_rows(keys, sig_path, cfg, str(tmp_path))
    assert [d for i, d in enumerate(docs) if kept_row[i] == i] == kept
    reasons = {d.doc_id + d.source: d.reason for d in drops}
    assert {docs[i].doc_id + docs[i].source: 'exact_duplicate' if exact[i] else 'near_duplicate'
            for i in np.flatnonzero(kept_row != np.arange(len(docs)))} == reasons
