"""Dedup across sources: exact (content hash) and near-duplicates (MinHash, LSH, union-find).

Documents are named by `doc_key` = (content hash, id hash): blake2b-128 of the normalised text and
blake2b-64 of (source, doc_id). Whatever is kept is the smallest key of its group, so the result does
not depend on reading order, batching or the runner (local or Beam), and a key is 24 bytes however
long the document's id: the local runner holds only these per document (`key_rows`).

Exact (`exact_duplicates`, `exact_rows`): documents with the same normalised text (`content_key`) are
one; the copy with the smallest id hash is kept.

Near-duplicates (Broder 1997; banding as in Leskovec et al., Mining of Massive Datasets, ch. 3):
1. Shingles (`shingle_hashes`): lowercased word 5-grams; a document whose letters are at least
   `cjk_threshold` Han characters (text.han_fraction, the langid rule) uses character 5-grams
   instead, as Chinese has no spaces. Words are runs of letters, digits and '_'. A document with
   fewer than 5 words has one shingle (all its words); one with none has no shingles and is never a
   duplicate.
2. Signature (`signatures`, `minhash`): one-permutation hashing (Li, Owen and Zhang 2012) with
   optimal densification (Shrivastava 2017). Each shingle's 64-bit hash picks one of `num_perm` bins
   with its high half and competes for that bin's minimum with its low half; an empty bin takes the
   value of the first filled bin on a probe sequence that depends only on the bin (so it is the same
   in every document). Two signatures agree in a bin with probability J, the Jaccard similarity of
   the shingle sets, like classic MinHash with num_perm hash functions, but a document costs
   O(shingles + num_perm) instead of O(shingles * num_perm). Measured on random sets: unbiased, with
   0.7-1.2x the variance of classic MinHash from 24 shingles up (1.8x for 5 shingles). All steps are
   numpy over a batch of documents (np.minimum.at scatters the minima).
3. Banding (`band_hashes`): the signature is cut into `bands` bands of `rows` values; two documents
   are candidates when all rows of some band agree. P(candidate) = 1 - (1 - J^rows)^bands for
   Jaccard similarity J: an S-curve rising at about (1/bands)^(1/rows). Defaults bands=14, rows=8
   (FineWeb's setting, 112 entries): threshold ~0.72; P = 0.99 at J=0.85, 0.77 at J=0.75, 0.05 at
   J=0.5. A band is keyed by a 64-bit hash of its rows; a hash collision only adds a candidate that
   step 4 rejects. With densified signatures the entries of a document with fewer shingles than
   bins are copies of one another, so for such short documents the curve can be less steep.
4. Candidate pairs (`bucket_pairs`): inside a bucket (the documents sharing a band key; a GroupByKey
   under Beam), pairs whose signatures agree in at least `threshold` (default 0.75) of the
   entries, the unbiased estimate of J. This removes the candidates that banding lets through below
   the curve: at J=0.5 the estimate from 112 entries exceeds 0.75 with probability ~1e-7. Buckets
   larger than `max_bucket` compare each member with the first `max_bucket` members only.
5. Clusters (`clusters`): connected components of the pairs (union-find). Each cluster keeps its
   document with the smallest `doc_key` and drops the others as 'near_duplicate'. Inside a bucket
   the members are taken in key order (`max_bucket` picks the smallest), as a Beam GroupByKey gives
   them in no fixed order.

Steps 1-2 are a pure function of a batch of texts, 3 of a batch of signatures, 4 of one bucket, 5 of
all pairs (small); `duplicates` needs only keys and signatures, never the texts. `dedup` composes
them for documents in memory; `near_rows` for a stream whose signatures are spilled to a file
(stages.py, the local runner); beam.py maps 1-3, groups by content hash (exact) and by (band, band
hash) for 4, and combines the pairs globally for 5.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import os
from typing import Iterator

import ml_collections
import numpy as np

from lmjax import errors
from lmjax.data import text as text_lib
from lmjax.data.records import Doc, Drop

_U64 = np.uint64
_BATCH_DOCS = 1024  # documents per signatures() call in dedup()
_CHUNK_CHARS = 1 << 18  # characters per shingle_hashes call inside signatures()
_EMPTY = np.uint32(0xFFFFFFFF)  # the signature value of a bin no shingle fell in


def defaults() -> ml_collections.ConfigDict:
  """The dedup stage's config (one for all sources: dedup runs across them)."""
  return ml_collections.ConfigDict(dict(
      exact=True,  # drop exact copies of a normalised text
      near=True,  # drop near-duplicates (MinHash LSH)
      ngram=5,  # words per shingle (characters in CJK documents)
      cjk_threshold=0.2,  # Han fraction of the letters from which a text uses character shingles
      num_perm=112,  # entries (one-permutation bins) of a signature; >= bands * rows
      bands=14, rows=8,  # LSH banding: candidate curve 1 - (1 - J^rows)^bands, knee ~0.72
      threshold=0.75,  # min estimated Jaccard of a duplicate pair; 0 accepts every candidate
      max_bucket=200,  # buckets above this compare each member with the first max_bucket only
      seed=0,  # seeds the hash functions: signatures compare only under the same seed and num_perm
  ))


# --- exact ----------------------------------------------------------------------------------------
def content_key(text: str) -> bytes:
  """16-byte blake2b of the text: the identity of a document for exact dedup and cluster order."""
  return hashlib.blake2b(text.encode('utf-8'), digest_size=16).digest()


def id_key(source: str, doc_id: str) -> bytes:
  """8-byte blake2b of (source, doc_id): which of several exact copies is kept."""
  return hashlib.blake2b(f'{source}\0{doc_id}'.encode('utf-8', 'surrogatepass'),
                         digest_size=8).digest()


def doc_key(doc: Doc) -> tuple[bytes, bytes]:
  """(content_key, id_key): orders the copies and clusters of a document, content first."""
  return content_key(doc.text), id_key(doc.source, doc.doc_id)


def key_rows(docs: list[Doc]) -> np.ndarray:
  """uint64[len(docs), 3]: doc_key as numbers (content high, content low, id), so that row order
  (np.lexsort) is doc_key order."""
  raw = b''.join(a + b for a, b in map(doc_key, docs))
  return np.frombuffer(raw, '>u8').astype(np.uint64).reshape(len(docs), 3)


def row_content(row: np.ndarray) -> bytes:
  """The content_key of a key_rows row."""
  return np.asarray(row[:2], '>u8').tobytes()


def exact_rows(keys: np.ndarray) -> np.ndarray:
  """int64[n]: for each key_rows row, the row of its content's kept copy (itself when kept)."""
  if not len(keys):
    return np.zeros(0, np.int64)
  order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
  k = keys[order]
  first = np.concatenate([[True], (k[1:, 0] != k[:-1, 0]) | (k[1:, 1] != k[:-1, 1])])
  kept_of = np.empty(len(keys), np.int64)
  kept_of[order] = order[np.flatnonzero(first)[np.cumsum(first) - 1]]
  return kept_of


def exact_duplicates(keys: list[tuple[bytes, bytes]]) -> dict[tuple, str]:
  """{key: 'exact_duplicate'} for every key whose content an earlier (smaller) key already has."""
  seen, out = set(), {}
  for key in sorted(keys):
    if key[0] in seen:
      out[key] = 'exact_duplicate'
    seen.add(key[0])
  return out


# --- hashing helpers ------------------------------------------------------------------------------
def _fmix64(x: np.ndarray) -> np.ndarray:
  """MurmurHash3's 64-bit finaliser: every input bit affects every output bit (uint64 -> uint64)."""
  x = x ^ (x >> _U64(33))
  x = x * _U64(0xFF51AFD7ED558CCD)
  x = x ^ (x >> _U64(33))
  x = x * _U64(0xC4CEB9FE1A85EC53)
  return x ^ (x >> _U64(33))


def _constants(seed: int, name: str, n: int) -> np.ndarray:
  """n random uint64 from (seed, name): the same in every process."""
  entropy = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), 'little')
  rng = np.random.default_rng([seed, entropy])
  return rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)


_RADIX = 0x9E3779B97F4A7C15  # odd, so invertible mod 2^64


def _power_table(n: int) -> tuple[np.ndarray, np.ndarray]:
  """(R^i, R^-i) mod 2^64 for i < n, each uint64[n]."""
  out = []
  for base in (_RADIX, pow(_RADIX, -1, 1 << 64)):
    table = np.full(n, base, np.uint64)
    table[0] = 1
    out.append(np.cumprod(table, dtype=np.uint64))  # wraps mod 2^64
  return out[0], out[1]


_CACHED_POWERS = _power_table(2 * _CHUNK_CHARS)  # covers every chunk but a single huge document


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
  """(R^i, R^-i) mod 2^64 for i < n, uint64[n] each."""
  if n <= len(_CACHED_POWERS[0]):
    return _CACHED_POWERS[0][:n], _CACHED_POWERS[1][:n]
  return _power_table(n)


def shingle_hashes(texts: list[str],
                   cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """The shingles of each text as 64-bit hashes, in CSR layout.

  Returns:
    (hashes uint64[S], offsets int64[len(texts) + 1]): text i's shingles are hashes[offsets[i]:
    offsets[i + 1]] (with repeats; a MinHash ignores them).
  """
  n = int(cfg.ngram)
  if not texts:
    return np.zeros(0, np.uint64), np.zeros(1, np.int64)
  texts = [t.lower() for t in texts]  # before measuring: lowering can change a text's length
  lengths = np.fromiter(map(len, texts), np.int64, len(texts)) + 1
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  # One code-point array for the batch; the newline after each text ends any word at its boundary.
  cps = text_lib.code_points('\n'.join(texts) + '\n')
  classes = text_lib.char_classes(cps)
  han = classes == text_lib.HAN
  letters = han | (classes == text_lib.LETTER)
  han_count = np.add.reduceat(han.view(np.uint8), starts, dtype=np.int64)
  letter_count = np.add.reduceat(letters.view(np.uint8), starts, dtype=np.int64)
  cjk_doc = (han_count >= cfg.cjk_threshold * letter_count) & (letter_count > 0)
  word = letters | (classes == text_lib.DIGIT) | (cps == ord('_'))
  # Tokens: runs of word characters, or single word characters in CJK documents. A token's hash is
  # fmix64 of its polynomial sum(c_k R^k) mod 2^64: summed over the batch as sum(c_i R^i) (non-word
  # characters count 0) from each token's start, then shifted back by R^-start.
  token_start = word & (np.concatenate([[True], ~word[:-1]]) | np.repeat(cjk_doc, lengths))
  first = np.flatnonzero(token_start)
  if not len(first):
    return np.zeros(0, np.uint64), np.zeros(len(texts) + 1, np.int64)
  powers, inverse_powers = _powers(len(cps))
  values = np.where(word, cps, 0).astype(np.uint64) * powers
  tokens = _fmix64(np.add.reduceat(values, first) * inverse_powers[first])
  token_doc = np.searchsorted(starts, first, side='right') - 1
  # Windows of n tokens inside one document; a document with fewer than n tokens gets one window.
  k = len(tokens)
  pad_doc = np.concatenate([token_doc, np.full(n - 1, -1)])
  pad_tokens = np.concatenate([tokens, np.zeros(n - 1, np.uint64)])
  window = np.zeros(k, np.uint64)
  for j, c in enumerate(_constants(cfg.seed, 'window', n)):
    same = pad_doc[j:j + k] == token_doc
    window += np.where(same, pad_tokens[j:j + k] * c, _U64(0))
  doc_tokens = np.bincount(token_doc, minlength=len(texts))
  is_first = np.concatenate([[True], token_doc[1:] != token_doc[:-1]])
  valid = (pad_doc[n - 1:n - 1 + k] == token_doc) | (is_first & (doc_tokens[token_doc] < n))
  hashes = _fmix64(window[valid])
  offsets = np.concatenate([[0], np.cumsum(np.bincount(token_doc[valid], minlength=len(texts)))])
  return hashes, offsets


# Probes per round of densification: few first (most empty bins find a filled one at once), then
# more for documents with few filled bins. After all rounds a bin with k of p bins filled is still
# empty with probability (1 - k/p)^4180: 1e-16 for k=1, p=112.
_PROBE_ROUNDS = (4, 16, 64) + (256,) * 16


@functools.lru_cache(maxsize=64)
def _probes(seed: int, p: int, attempt: int, count: int) -> np.ndarray:
  """int64[p, count]: bins j_attempt(i) .. j_(attempt + count - 1)(i) of bin i's probe sequence."""
  t = np.arange(attempt, attempt + count, dtype=np.uint64)[None, :]
  key = t * _U64(p) + np.arange(p, dtype=np.uint64)[:, None] + _constants(seed, 'probe', 1)[0]
  return (((_fmix64(key) >> _U64(32)) * _U64(p)) >> _U64(32)).astype(np.int64)


def signatures(texts: list[str], cfg: ml_collections.ConfigDict) -> np.ndarray:
  """uint32[len(texts), num_perm]: each text's MinHash signature (all 0xFFFFFFFF without shingles).

  Works through the texts in chunks of about _CHUNK_CHARS characters, so the per-character arrays
  of shingle_hashes stay in cache (2-3x faster than one large batch).
  """
  out, lo, chars = [], 0, 0
  for hi, text in enumerate(texts):
    if chars and chars + len(text) > _CHUNK_CHARS:
      out.append(minhash(*shingle_hashes(texts[lo:hi], cfg), cfg))
      lo, chars = hi, 0
    chars += len(text)
  out.append(minhash(*shingle_hashes(texts[lo:], cfg), cfg))
  return np.concatenate(out)


def minhash(hashes: np.ndarray, offsets: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
  """uint32[D, num_perm]: one-permutation MinHash, densified, of D shingle sets in CSR layout.

  Args:
    hashes: uint64[S], shingle hashes (as from shingle_hashes); offsets: int64[D + 1].
  """
  p, n_docs = int(cfg.num_perm), len(offsets) - 1
  doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), np.diff(offsets))
  bins = (((hashes >> _U64(32)) * _U64(p)) >> _U64(32)).astype(np.int64)  # uniform in [0, p)
  flat = doc_of * p + bins
  sig = np.full(n_docs * p, _EMPTY, np.uint32)
  np.minimum.at(sig, flat, (hashes & _U64(0xFFFFFFFF)).astype(np.uint32))
  filled = np.zeros(n_docs * p, bool)
  filled[flat] = True
  sig, filled = sig.reshape(n_docs, p), filled.reshape(n_docs, p)
  # Optimal densification: empty bin i takes the value of the first non-empty bin on its probe
  # sequence j_0(i), j_1(i), ... -- a sequence shared by all documents.
  d, i = np.nonzero(~filled & filled.any(axis=1, keepdims=True))
  original, attempt, flat_filled = sig.copy(), 0, filled.reshape(-1)
  for count in _PROBE_ROUNDS:
    if not len(d):
      break
    candidates = _probes(int(cfg.seed), p, attempt, count)[i]  # [n, count]
    ok = flat_filled[d[:, None] * p + candidates]
    found = ok.any(axis=1)
    j = candidates[found, ok[found].argmax(axis=1)]
    sig[d[found], i[found]] = original[d[found], j]
    d, i = d[~found], i[~found]
    attempt += count
  return sig


def band_hashes(sigs: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
  """uint64[D, bands]: band j of document i is keyed by (j, out[i, j]) (a hash of its rows)."""
  bands, rows = int(cfg.bands), int(cfg.rows)
  if bands * rows > sigs.shape[1]:
    raise errors.ConfigError(f'dedup: bands * rows = {bands} * {rows} > num_perm = {sigs.shape[1]}')
  banded = sigs[:, :bands * rows].reshape(len(sigs), bands, rows).astype(np.uint64)
  mix = _constants(cfg.seed, 'band', rows)
  return _fmix64((banded * mix).sum(axis=2, dtype=np.uint64))


def has_shingles(sigs: np.ndarray) -> np.ndarray:
  """bool[D]: which signatures come from at least one shingle (the others are never banded)."""
  return (sigs != np.iinfo(np.uint32).max).any(axis=1)


def bucket_pairs(keys: list, sigs: np.ndarray,
                 cfg: ml_collections.ConfigDict) -> Iterator[tuple]:
  """The duplicate pairs (key_i, key_j) of one bucket: estimated Jaccard >= cfg.threshold, made a
  few rows at a time (a large bucket has up to max_bucket pairs per member).

  Args:
    keys: the bucket's document keys (any orderable values), m of them.
    sigs: uint32[m, num_perm], their signatures.
  """
  m = len(keys)
  if m < 2:
    return
  anchors = min(m, int(cfg.max_bucket))
  for lo in range(0, m, _PAIR_ROWS):  # [rows, anchors, num_perm] at a time: bounded in a big bucket
    agree = (sigs[lo:lo + _PAIR_ROWS, None, :] == sigs[None, :anchors, :]).mean(axis=2)
    i, j = np.nonzero(agree >= cfg.threshold)
    yield from ((keys[lo + a], keys[b]) for a, b in zip(i.tolist(), j.tolist()) if b < lo + a)


def _find(parent: dict, x):
  parent.setdefault(x, x)
  while parent[x] != x:
    parent[x] = parent[parent[x]]
    x = parent[x]
  return x


def union(parent: dict, pairs) -> dict:
  """Joins the pairs into the union-find forest `parent` ({key: parent key}, updated and returned);
  the smaller root stays the root, so a root is its component's smallest key."""
  for x, y in pairs:
    rx, ry = _find(parent, x), _find(parent, y)
    if rx != ry:
      parent[max(rx, ry)] = min(rx, ry)
  return parent


def roots(parent: dict) -> dict:
  """{key: the smallest key of its connected component} for every key of a union-find forest."""
  return {x: _find(parent, x) for x in list(parent)}


def clusters(pairs) -> dict:
  """{key: the smallest key of its connected component} for every key in `pairs` (union-find)."""
  return roots(union({}, pairs))


# Connected components by Hash-to-Min (Rastogi et al., "Finding Connected Components in Map-Reduce
# in Logarithmic Rounds", ICDE 2013): the distributed form of `clusters`. Each node v holds a set C_v,
# first {v} and its neighbours; in a round v sends C_v to m = min(C_v) and {m} to every other member,
# and the new C_v is the union of what v received. At the fixed point the smallest node of a
# component holds the whole component and every other node holds {that node}. A Beam pipeline runs the
# two functions below as FlatMap -> GroupByKey -> Map; `components` is the same rounds in memory.
def hash_to_min_messages(node, cluster: tuple) -> Iterator[tuple]:
  """A round's messages of `node` holding the sorted tuple `cluster`: (receiver, tuple of nodes)."""
  m = cluster[0]
  yield m, cluster
  for u in cluster[1:]:
    yield u, (m,)


def hash_to_min_merge(received) -> tuple:
  """The new sorted cluster of a node from the tuples it received."""
  return tuple(sorted(set().union(*received)))


def neighbourhood(pair: tuple) -> Iterator[tuple]:
  """A pair's (node, pair) messages: their merge (hash_to_min_merge per node) over all pairs is
  {node} and its neighbours."""
  a, b = pair
  yield a, (a, b)
  yield b, (a, b)


def components(pairs, rounds: int) -> tuple[dict, int]:
  """({node: the smallest node of its component}, the rounds that changed a set) by Hash-to-Min; the
  in-memory reference of the Beam runner's near-duplicate clusters. Raises RuntimeError if a set
  still changed in the last of `rounds` rounds (as the Beam runner does; a path of n nodes takes
  about log2(n) + 3 changing rounds)."""
  state = _grouped(m for pair in pairs for m in neighbourhood(pair))
  for r in range(rounds):
    new = _grouped(msg for node, c in state.items() for msg in hash_to_min_messages(node, c))
    if new == state:
      return {node: min(c[0], node) for node, c in state.items()}, r
    state = new
  raise errors.ConfigError(f'near-duplicate clusters still changed in the last of {rounds} Hash-to-Min '
                     'rounds')


def _grouped(messages) -> dict:
  """{node: hash_to_min_merge of the tuples sent to it} of (node, tuple) messages."""
  by_node = collections.defaultdict(list)
  for node, c in messages:
    by_node[node].append(c)
  return {node: hash_to_min_merge(cs) for node, cs in by_node.items()}


def candidate_buckets(bands: np.ndarray) -> list[np.ndarray]:
  """The index arrays of documents sharing a band key (2 or more), band by band."""
  out = []
  for j in range(bands.shape[1]):
    order = np.argsort(bands[:, j], kind='stable')
    keys = bands[order, j]
    cut = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1], [True]]))
    out += [order[lo:hi] for lo, hi in zip(cut[:-1], cut[1:]) if hi - lo > 1]
  return out


def duplicate_pairs(keys: list, sigs: np.ndarray, cfg: ml_collections.ConfigDict) -> set[tuple]:
  """All verified pairs (key_i, key_j) among documents with signatures uint32[D, num_perm]."""
  live = np.flatnonzero(has_shingles(sigs))
  bands = band_hashes(sigs[live], cfg)
  pairs = set()
  for bucket in candidate_buckets(bands):
    docs = sorted(live[bucket], key=lambda d: keys[d])
    pairs.update(bucket_pairs([keys[d] for d in docs], sigs[docs], cfg))
  return pairs


def near_duplicates(keys: list, sigs: np.ndarray,
                    cfg: ml_collections.ConfigDict) -> dict[tuple, str]:
  """{key: 'near_duplicate'} for every key that is not the smallest of its cluster."""
  root = clusters(duplicate_pairs(keys, sigs, cfg))
  return {key: 'near_duplicate' for key, r in root.items() if key != r}


_CHUNK_ROWS = 1 << 11  # signature rows banded at a time by near_rows (~5 MB of temporaries)
_PAIR_ROWS = 64  # bucket members compared with the anchors at a time (64 x 200 x 112 bytes)


def row_key(row: np.ndarray) -> bytes:
  """doc_key of a key_rows row as one bytes value (content_key + id_key): same order as doc_key."""
  return np.asarray(row, '>u8').tobytes()


def near_rows(keys: np.ndarray, live: np.ndarray, sig_path: str, cfg: ml_collections.ConfigDict,
              tmp: str) -> np.ndarray:
  """int64[n]: for each key_rows row, the row its near-duplicate cluster keeps (itself if none).

  The streaming form of `near_duplicates`: signatures stay in `sig_path` (uint32[n, num_perm] rows,
  as written batch by batch), band keys go to one file per band in `tmp`, and only one band's keys
  (8 bytes per document) and the rows of one bucket are in memory at a time.

  Args:
    keys: uint64[n, 3], key_rows of the documents; live: bool[n], those that take part.
  """
  n, p, bands = len(keys), int(cfg.num_perm), int(cfg.bands)
  out = np.arange(n, dtype=np.int64)
  band_paths = [os.path.join(tmp, f'band{j}.bin') for j in range(bands)]
  files = [open(path, 'wb') for path in band_paths]
  banded = []
  with open(sig_path, 'rb') as sig_file:
    for lo in range(0, n, _CHUNK_ROWS):
      chunk = np.fromfile(sig_file, np.uint32, min(_CHUNK_ROWS, n - lo) * p).reshape(-1, p)
      rows = np.flatnonzero(live[lo:lo + len(chunk)] & has_shingles(chunk))
      banded.append(rows + lo)
      for f, column in zip(files, band_hashes(chunk[rows], cfg).T):
        f.write(np.ascontiguousarray(column).tobytes())
    for f in files:
      f.close()
    banded = np.concatenate(banded) if banded else np.zeros(0, np.int64)

    def read_rows(rows):
      out_sigs = np.empty((len(rows), p), np.uint32)
      for a, r in enumerate(rows):
        sig_file.seek(int(r) * p * 4)
        out_sigs[a] = np.frombuffer(sig_file.read(p * 4), np.uint32)
      return out_sigs

    parent, row_of = {}, {}  # the forest grows with the documents in clusters, not with the pairs
    for path in band_paths:
      for bucket in candidate_buckets(np.fromfile(path, np.uint64)[:, None]):
        rows = banded[bucket]
        rows = rows[np.lexsort((keys[rows, 2], keys[rows, 1], keys[rows, 0]))]
        bucket_keys = [row_key(keys[r]) for r in rows]
        before = len(parent)
        union(parent, bucket_pairs(bucket_keys, read_rows(rows), cfg))
        if len(parent) > before:
          row_of.update(zip(bucket_keys, rows.tolist()))
      os.remove(path)
  for key, root in roots(parent).items():
    out[row_of[key]] = row_of[root]
  return out


def duplicate_rows(keys: np.ndarray, sig_path: str, cfg: ml_collections.ConfigDict,
                   tmp: str) -> tuple[np.ndarray, np.ndarray]:
  """(kept_row int64[n], exact bool[n]): for each key_rows row, the row kept in its place (itself
  when kept) and whether it is an exact copy (else, when not kept, a near-duplicate). Signatures
  are read from `sig_path` (see near_rows)."""
  rows = np.arange(len(keys), dtype=np.int64)
  kept_row = exact_rows(keys) if cfg.exact else rows
  exact = kept_row != rows
  if cfg.near:
    near = near_rows(keys, ~exact, sig_path, cfg, tmp)
    kept_row = np.where(exact, kept_row, near)
  return kept_row, exact


def duplicates(keys: list, sigs: np.ndarray, cfg: ml_collections.ConfigDict) -> dict[tuple, str]:
  """{key: reason} for the documents to drop: exact copies, then near-duplicates of the rest.

  Args:
    keys: doc_key of each document (unique); sigs: uint32[len(keys), num_perm], their signatures.
  """
  out = exact_duplicates(keys) if cfg.exact else {}
  if cfg.near:
    live = [i for i, key in enumerate(keys) if key not in out]
    out.update(near_duplicates([keys[i] for i in live], sigs[live], cfg))
  return out


def dedup(docs: list[Doc], cfg: ml_collections.ConfigDict) -> tuple[list[Doc], list[Drop]]:
  """(docs without exact copies and near-duplicates, in input order; Drops), across sources.

  The in-memory reference of the runners' streaming path (key_rows, exact_rows, duplicate_rows:
  the same keys, buckets and keep rule with bounded memory): tests/test_data_dedup.py checks that
  both drop the same documents, and the planted-set acceptance test runs on this one."""
  keys = [doc_key(d) for d in docs]
  texts = [d.text for d in docs]
  sigs = np.concatenate([signatures(texts[i:i + _BATCH_DOCS], cfg)
                         for i in range(0, len(texts), _BATCH_DOCS)] or
                        [np.zeros((0, int(cfg.num_perm)), np.uint32)])
  drop = duplicates(keys, sigs, cfg)
  kept = [d for d, key in zip(docs, keys) if key not in drop]
  drops = [Drop(d.source, d.doc_id, 'dedup', drop[key], len(d.text))
           for d, key in zip(docs, keys) if key in drop]
  return kept, drops
