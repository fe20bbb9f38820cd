"""An in-memory stand-in for pipeline.SourceData: documents given by their lengths and a function of
(document index, length) that makes their token ids, read as one stream of `[BOS] ids [EOS]`."""
import numpy as np


class DocStream:

  def __init__(self, lengths, ids_of):
    self.lengths = np.asarray(lengths, np.int64)
    self._ids_of = ids_of
    self._starts = np.concatenate([[0], np.cumsum(self.lengths + 2)])  # BOS and EOS
    self.num_tokens = int(self._starts[-1])

  def span(self, begin, end):
    """[(ids, stream position of its BOS)] of the documents overlapping positions [begin, end)."""
    first = int(np.searchsorted(self._starts, begin, side='right')) - 1
    last = int(np.searchsorted(self._starts, end, side='left'))
    return [(self._ids_of(i, int(self.lengths[i])), int(self._starts[i])) for i in range(first, last)]
