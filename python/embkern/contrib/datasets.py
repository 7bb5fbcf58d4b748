"""Small offline knowledge graphs (Nations, Kinships, UMLS) and filter lists.

The triples come from the text files that the ``pykeen`` wheel ships in
``pykeen/datasets/<name>/{train,valid,test}.txt`` (one ``head<TAB>relation<TAB>tail``
per line). They are read straight from disk; pykeen itself is never imported,
so its ~20 runtime dependencies are not needed. Install the data with::

    python -m pip install --no-deps pykeen==1.11.1

Sizes (entities / relations / train / valid / test): Nations 14 / 55 / 1592 /
199 / 201, Kinships 104 / 25 / 8544 / 1068 / 1074, UMLS 135 / 46 / 5216 /
652 / 661.

Ids: entity and relation names are sorted and numbered over the union of the
three splits. For these three datasets every valid/test name also occurs in
train, so the ids equal PyKEEN's (sorted over the training names).

Reciprocal relations: a triple (h, r, t) gains its inverse (t, r + R, h), R
the number of base relations, so one tail-prediction model answers both
(h, r, ?) and (?, r, t) (the latter as (t, r + R, ?)).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["KG_DATASETS", "PYKEEN_DATA_INSTALL", "KGDataset", "TailFilter", "add_reciprocal", "build_filter",
           "load_kg", "pykeen_data_dir"]

KG_DATASETS = ("nations", "kinships", "umls")
SPLITS = ("train", "valid", "test")
PYKEEN_DATA_INSTALL = "python -m pip install --no-deps pykeen==1.11.1"


def pykeen_data_dir() -> Optional[str]:
    """Directory ``.../site-packages/pykeen/datasets`` of an installed pykeen, or None.

    ``importlib.util.find_spec`` on a top-level name locates the package without
    executing its ``__init__`` (which would import pandas, scipy, ...).
    """
    candidates: List[str] = []
    try:
        spec = importlib.util.find_spec("pykeen")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(spec.submodule_search_locations)
    # A namespace-less fallback: scan sys.path for a pykeen/ folder (e.g. when a
    # broken pykeen __init__ makes find_spec misbehave in odd environments).
    candidates.extend(os.path.join(p, "pykeen") for p in sys.path if p)
    for pkg in candidates:
        d = os.path.join(pkg, "datasets")
        if os.path.isfile(os.path.join(d, "nations", "train.txt")):
            return d
    return None


def _read_triples(path: str) -> List[Tuple[str, str, str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise ValueError(f"{path}:{lineno}: expected 3 tab-separated fields (head, relation, tail), "
                                 f"got {len(parts)}")
            out.append((parts[0], parts[1], parts[2]))
    return out


def add_reciprocal(triples: Tensor, num_relations: int) -> Tensor:
    """Append the inverse triples (t, r + num_relations, h).

    Args:
        triples: (n, 3) int64 (head, relation, tail) with relations in [0, num_relations).
    Returns:
        (2n, 3) int64: the n originals followed by their n inverses.
    """
    triples = _as_triples(triples, "triples")
    if triples.numel() and int(triples[:, 1].max()) >= num_relations:
        raise ValueError(f"triples: expected relation ids in [0, {num_relations}) before adding reciprocals, "
                         f"got {int(triples[:, 1].max())}")
    inv = torch.stack([triples[:, 2], triples[:, 1] + num_relations, triples[:, 0]], dim=1)
    return torch.cat([triples, inv], dim=0)


def _as_triples(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (n, 3), got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (n, 3) (head, relation, tail), got {tuple(x.shape)}")
    if x.numel() and int(x.min()) < 0:
        raise ValueError(f"{name}: expected non-negative ids, got {int(x.min())}")
    return x.to(torch.int64)


class TailFilter:
    """All known tails of each (head, relation) query, as a CSR list over sorted keys.

    Keys are ``head * num_relations + relation`` (``num_relations`` counting the
    reciprocal ids when present); each row lists its distinct tails in
    ascending order. Memory is O(#known triples), not O(N * R).

    Attributes:
        keys: (K,) int64, sorted, unique.
        offsets: (K + 1,) int64.
        index: (nnz,) int64 tail ids.
    """

    def __init__(self, triples: Tensor, num_entities: int, num_relations: int):
        triples = _as_triples(triples, "triples").cpu()
        self.num_entities = int(num_entities)
        self.num_relations = int(num_relations)
        if triples.numel():
            for col, name, upper in ((0, "head", num_entities), (1, "relation", num_relations),
                                     (2, "tail", num_entities)):
                hi = int(triples[:, col].max())
                if hi >= upper:
                    raise ValueError(f"triples: expected {name} ids in [0, {upper}), got {hi}")
        key = triples[:, 0] * self.num_relations + triples[:, 1]
        # One sort on (key, tail) dedups repeated triples and orders tails within a row;
        # key * N + t < N^2 R ~ 1e11 for FB15k-237, well inside int64.
        pair = torch.unique(key * self.num_entities + triples[:, 2])
        k, t = pair // self.num_entities, pair % self.num_entities
        self.keys, counts = torch.unique_consecutive(k, return_counts=True)
        self.offsets = torch.zeros(self.keys.numel() + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(counts, 0)
        self.index = t

    def __len__(self) -> int:
        return int(self.index.numel())

    def lookup(self, h: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
        """Known tails for a batch of queries, ready for ``embkern.rank_all(filter_index=...)``.

        Args:
            h, r: (B,) integer head and relation ids.
        Returns:
            ``(offsets (B + 1,), index (nnz,))`` int64 on h's device; row b lists the
            known tails of (h[b], r[b]) (empty when the query was never seen).
        """
        if h.shape != r.shape or h.dim() != 1:
            raise ValueError(f"h, r: expected two (B,) tensors of the same shape, got {tuple(h.shape)} and "
                             f"{tuple(r.shape)}")
        device = h.device
        hh, rr = h.detach().cpu().to(torch.int64), r.detach().cpu().to(torch.int64)
        # Out-of-range ids would alias another (head, relation) key: reject them.
        for name, x, upper in (("h", hh, self.num_entities), ("r", rr, self.num_relations)):
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= upper):
                bad = int(x.min()) if int(x.min()) < 0 else int(x.max())
                raise ValueError(f"{name}: expected ids in [0, {upper}), got {bad}")
        q = hh * self.num_relations + rr
        K = self.keys.numel()
        pos = torch.searchsorted(self.keys, q).clamp_(max=max(K - 1, 0))
        found = self.keys[pos] == q if K else torch.zeros_like(q, dtype=torch.bool)
        start = torch.where(found, self.offsets[pos], torch.zeros_like(q)) if K else torch.zeros_like(q)
        cnt = torch.where(found, self.offsets[pos + 1] - self.offsets[pos], torch.zeros_like(q)) if K \
            else torch.zeros_like(q)
        off = torch.zeros(q.numel() + 1, dtype=torch.int64)
        off[1:] = torch.cumsum(cnt, 0)
        total = int(off[-1])
        # Element j of row b sits at start[b] + (j - off[b]) in the global index.
        src = torch.arange(total, dtype=torch.int64) + torch.repeat_interleave(start - off[:-1], cnt)
        return off.to(device), self.index[src].to(device)

    def tails(self, h: int, r: int) -> List[int]:
        """Known tails of one query (a convenience for inspection and tests)."""
        return self.lookup(torch.tensor([h]), torch.tensor([r]))[1].tolist()


def build_filter(*triple_sets: Tensor, num_entities: int, num_relations: int, reciprocal: bool = True) -> TailFilter:
    """Filter over the union of some triple sets (typically train, valid, test).

    Args:
        triple_sets: (n_i, 3) int64 tensors with BASE relation ids in [0, num_relations).
        reciprocal: also index (t, r + num_relations) -> h, for head prediction
            through reciprocal relations.
    """
    parts = [_as_triples(t, f"triple_sets[{i}]") for i, t in enumerate(triple_sets)]
    allt = torch.cat(parts) if parts else torch.zeros(0, 3, dtype=torch.int64)
    if reciprocal:
        allt = add_reciprocal(allt, num_relations)
    return TailFilter(allt, num_entities, num_relations * (2 if reciprocal else 1))


@dataclass(frozen=True, eq=False)
class KGDataset:
    """A knowledge graph split into train / valid / test.

    Attributes:
        name: dataset name.
        entity_to_id, relation_to_id: sorted names -> consecutive ids.
        train, valid, test: (n, 3) int64 (head, relation, tail), base relation ids.
    """

    name: str
    entity_to_id: Dict[str, int]
    relation_to_id: Dict[str, int]
    train: Tensor
    valid: Tensor
    test: Tensor
    _filters: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_entities(self) -> int:
        return len(self.entity_to_id)

    @property
    def num_relations(self) -> int:
        """Base relations (without reciprocals)."""
        return len(self.relation_to_id)

    def reciprocal(self, split: str = "train") -> Tensor:
        """(2n, 3) triples of one split plus their inverses (t, r + num_relations, h)."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        return add_reciprocal(getattr(self, split), self.num_relations)

    def filter(self, reciprocal: bool = True) -> TailFilter:
        """Known tails over train + valid + test (the standard filtered setting); cached."""
        if reciprocal not in self._filters:
            self._filters[reciprocal] = build_filter(self.train, self.valid, self.test,
                                                     num_entities=self.num_entities,
                                                     num_relations=self.num_relations, reciprocal=reciprocal)
        return self._filters[reciprocal]

    def __repr__(self) -> str:
        return (f"KGDataset({self.name!r}, entities={self.num_entities}, relations={self.num_relations}, "
                f"train={len(self.train)}, valid={len(self.valid)}, test={len(self.test)})")


def load_kg(name: str, root: Optional[str] = None) -> KGDataset:
    """Load Nations, Kinships or UMLS from the installed pykeen wheel's text files.

    Args:
        name: "nations" | "kinships" | "umls" (case-insensitive).
        root: optional directory holding ``<name>/{train,valid,test}.txt``; by
            default the ``pykeen/datasets`` folder of an installed pykeen.
    Returns:
        :class:`KGDataset` with (n, 3) int64 splits.
    Raises:
        ValueError: unknown name. FileNotFoundError: data not installed (the
        message gives the pip command).
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    key = name.lower()
    if key not in KG_DATASETS:
        raise ValueError(f"name: expected one of {KG_DATASETS}, got {name!r}")
    base = root if root is not None else pykeen_data_dir()
    if base is None:
        raise FileNotFoundError(f"embkern.contrib.datasets.load_kg({name!r}): the triples ship inside the pykeen wheel, "
                                f"which is not installed; run `{PYKEEN_DATA_INSTALL}` (the files are read "
                                "without importing pykeen, so --no-deps is enough)")
    raw = {}
    for split in SPLITS:
        path = os.path.join(base, key, f"{split}.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"embkern.contrib.datasets.load_kg({name!r}): missing {path}; reinstall the data with "
                                    f"`{PYKEEN_DATA_INSTALL}`")
        raw[split] = _read_triples(path)
    ents = sorted({x for rows in raw.values() for h, _, t in rows for x in (h, t)})
    rels = sorted({r for rows in raw.values() for _, r, _ in rows})
    e2i = {e: i for i, e in enumerate(ents)}
    r2i = {r: i for i, r in enumerate(rels)}

    def encode(rows: Sequence[Tuple[str, str, str]]) -> Tensor:
        if not rows:
            return torch.zeros(0, 3, dtype=torch.int64)
        return torch.tensor([(e2i[h], r2i[r], e2i[t]) for h, r, t in rows], dtype=torch.int64)

    return KGDataset(key, e2i, r2i, encode(raw["train"]), encode(raw["valid"]), encode(raw["test"]))
