"""Corpus-scale jobs on Dask: FDE encoding of a multi-vector corpus (and, with the
bit-cipher op, sharded co-occurrence counting), identical to one process.

Both jobs are embarrassingly parallel with an exact merge, so embkern does not
schedule anything itself: each shard of the input is one Dask task that runs
embkern's kernel on a worker, and the results are written or merged in a fixed
order. ``client=None`` starts a :class:`distributed.LocalCluster` on this machine
(one single-threaded worker process per core) and closes it afterwards; passing
a :class:`distributed.Client` runs on whatever cluster it is connected to::

    # on the scheduler host            # on each worker host
    $ dask scheduler                   $ dask worker tcp://scheduler:8786 --nthreads 1

    >>> from distributed import Client
    >>> embkern.distributed.encode_corpus(shards, config, "fde-out/", client=Client("tcp://scheduler:8786"))

Dask is an optional extra (``pip install embkern[distributed]``); ``import
embkern`` never imports it, this subpackage imports it on first use.
See ``docs/distributed.md`` for shard sizes, memory per worker and where the
output lives.
"""

from __future__ import annotations

from ._cipher import cooccurrence_vectors, fit_cipher
from ._fde import encode_corpus, read_encodings

__all__ = ["encode_corpus", "read_encodings", "fit_cipher", "cooccurrence_vectors"]
