"""Feature groups: the players of an explanation, as sets of input elements.

One representation serves every modality. An input row is a flat vector of elements (every
model input flattened and concatenated, as the model adapter sees it); a group is the set of
elements carrying one group id in `index`. Elements with id -1 belong to no group: they always
keep the explained row's value (text padding, say). Tabular models get one group per column;
images a grid of patches; text one group per non-pad token; a request may send its own mask of
group ids (superpixels). Groups may form a hierarchy (Owen values, `partition`).

Estimators see d players; the masked batches they build over players become element masks
through `expand` (one gather, skipped when each element is its own group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explainers.errors import FailedPrecondition, InvalidArgument

Array = np.ndarray  # the contract's alias (base.py imports this module, not the reverse)

NO_GROUP = -1


@dataclass(frozen=True)
class Hierarchy:
    """A tree over d leaf groups. Node ids 0..d-1 are the groups; internal node k has id d + k
    and children `children[k]`; the root is the last internal node."""

    leaves: int
    children: tuple[tuple[int, ...], ...]

    @property
    def root(self) -> int:
        return self.leaves + len(self.children) - 1

    def kids(self, node: int) -> tuple[int, ...]:
        """Children of a node; a leaf has none."""
        return () if node < self.leaves else self.children[node - self.leaves]

    def members(self, node: int) -> tuple[int, ...]:
        """The leaf groups under a node, in order."""
        if node < self.leaves:
            return (node,)
        return tuple(g for k in self.kids(node) for g in self.members(k))

    @staticmethod
    def build(leaves: int, children: Sequence[Sequence[int]]) -> Hierarchy:
        """Check that every node but the root has exactly one parent and every internal node
        has at least two children, so the tree is a partition of the leaves at every level."""
        kids = tuple(tuple(int(c) for c in k) for k in children)
        h = Hierarchy(leaves, kids)
        seen = [c for k in kids for c in k]
        expected = set(range(h.root))
        if not kids or sorted(seen) != sorted(expected) or any(len(k) < 2 for k in kids) \
                or any(c >= leaves + i for i, k in enumerate(kids) for c in k):
            raise InvalidArgument("groups.hierarchy: must be a tree over the groups: each node "
                                  "but the root in exactly one parent listed before it, at "
                                  "least two children per node")
        return h

    @staticmethod
    def flat(leaves: int) -> Hierarchy:
        """Every group a child of the root: Owen values then equal Shapley values."""
        return Hierarchy(leaves, (tuple(range(leaves)),))


@dataclass(frozen=True)
class Groups:
    """The players of a game: a group id per input element (-1 = never masked) and labels."""

    index: Array  # (elements,) int64 group id per element
    labels: tuple[str, ...]
    hierarchy: Hierarchy | None = None
    identity: bool = False  # element j is group j for every j: expansion is a no-op

    @property
    def size(self) -> int:
        """Number of players d."""
        return len(self.labels)

    @property
    def elements(self) -> int:
        return int(self.index.size)

    @staticmethod
    def columns(names: Sequence[str]) -> Groups:
        """One group per element (tabular default: today's per-feature attributions)."""
        index = np.arange(len(names))
        index.setflags(write=False)
        return Groups(index, tuple(names), identity=True)

    @staticmethod
    def each(d: int) -> Groups:
        """One group per element, labelled by position (estimators' default)."""
        return Groups.columns([str(j) for j in range(d)])

    @staticmethod
    def build(index: Array, labels: Sequence[str] | None = None,
              hierarchy: Hierarchy | None = None, field: str = "groups") -> Groups:
        """Groups from a mask of ids 0..d-1 per element (-1 = no group), checked: ids
        contiguous from 0, every group non-empty, one label per group."""
        ids = np.asarray(index)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise InvalidArgument(f"{field}: a flat integer mask of group ids is required")
        d = int(ids.max()) + 1 if ids.size and ids.max() >= 0 else 0
        if ids.size and ids.min() < NO_GROUP:
            raise InvalidArgument(f"{field}: group ids must be >= -1 (-1 = no group)")
        counts = np.bincount(ids[ids >= 0], minlength=d)
        if d == 0 or np.any(counts == 0):
            missing = int(np.flatnonzero(counts == 0)[0]) if d else 0
            raise InvalidArgument(f"{field}: group ids must run 0..d-1 with every id used; "
                                  f"id {missing} has no element")
        names = tuple(labels) if labels is not None else tuple(f"group {g}" for g in range(d))
        if len(names) != d:
            raise InvalidArgument(f"{field}: {len(names)} labels for {d} groups")
        if hierarchy is not None and hierarchy.leaves != d:
            raise InvalidArgument(f"{field}.hierarchy: over {hierarchy.leaves} groups, not {d}")
        frozen = ids.astype(np.int64)
        frozen.setflags(write=False)
        return Groups(frozen, names, hierarchy, identity=bool(np.array_equal(ids, np.arange(d))))

    def with_hierarchy(self, hierarchy: Hierarchy) -> Groups:
        if hierarchy.leaves != self.size:
            raise InvalidArgument(f"groups.hierarchy: over {hierarchy.leaves} groups, not "
                                  f"{self.size}")
        return Groups(self.index, self.labels, hierarchy, self.identity)

    def expand(self, masks: Array) -> Array:
        """Player masks (..., d) bool -> element masks (..., elements); elements in no group
        are always True (they keep the explained row's value)."""
        if self.identity:
            return masks
        padded = np.concatenate([masks, np.ones((*masks.shape[:-1], 1), bool)], axis=-1)
        return np.take(padded, self.index, axis=-1)  # index -1 picks the padding column; C
        # order, which padded[..., index] is not

    def expand_ranks(self, ranks: Array) -> Array:
        """Player ranks in orders (paths, d) -> element ranks (paths, elements); elements in no
        group get rank -1, so they come from x at every step of every path."""
        if self.identity:
            return ranks
        padded = np.concatenate([ranks, np.full((ranks.shape[0], 1), -1, ranks.dtype)], axis=1)
        return np.take(padded, self.index, axis=1)  # C order (padded[:, index] is not)

    def to_map(self, values: Array) -> Array:
        """Per-group values (outputs, d) -> per-element map (outputs, elements): each element
        gets its group's value, elements in no group 0."""
        if self.identity:
            return values
        padded = np.concatenate([values, np.zeros((values.shape[0], 1))], axis=1)
        return padded[:, self.index]

    def sum_elements(self, values: Array) -> Array:
        """Per-element values (outputs, elements) -> per-group sums (outputs, d)."""
        if self.identity:
            return values
        keep = self.index >= 0
        out = np.zeros((values.shape[0], self.size))
        np.add.at(out.T, self.index[keep], values[:, keep].T)
        return out


def ungrouped(method: str, groups: Groups | None) -> None:
    """For methods that attribute to single features only (tree, linear)."""
    if groups is not None and not groups.identity:
        raise FailedPrecondition(f"method: {method} explains single features, not groups")


def grid(shape: Sequence[int], spatial: Sequence[int], cells: Sequence[int],
         offset: int = 0) -> tuple[Array, tuple[str, ...], tuple[int, ...]]:
    """Patch ids for one input of element shape `shape` (no batch): the axes in `spatial` are
    cut into `cells[k]` near-equal bands, the other axes (channels) share their patch.
    Returns (elements,) ids starting at `offset`, labels, and the grid's cell counts."""
    bands = []
    for axis, n in zip(spatial, cells, strict=True):
        size = shape[axis]
        n = max(1, min(int(n), size))
        bands.append((np.arange(size) * n // size, n))
    ids = np.zeros(tuple(shape), np.int64)
    stride = 1
    for (band, n), axis in reversed(list(zip(bands, spatial, strict=True))):
        view = [1] * len(shape)
        view[axis] = shape[axis]
        ids = ids + stride * band.reshape(view)
        stride *= n
    counts = tuple(n for _, n in bands)
    labels = tuple("patch " + ",".join(str(c) for c in np.unravel_index(g, counts))
                   for g in range(int(np.prod(counts))))
    return ids.ravel() + offset, labels, counts


def quadtree(counts: Sequence[int]) -> Hierarchy:
    """A hierarchy over a grid of patches (row-major ids): cells are merged 2 x 2 (2 per axis
    where an axis still has more than one band) level by level up to one root."""
    level = np.arange(int(np.prod(counts))).reshape(tuple(counts))
    d, children, nxt = level.size, [], level.size
    while level.size > 1:
        shape = tuple(-(-s // 2) for s in level.shape)
        merged = np.empty(shape, np.int64)
        for cell in np.ndindex(*shape):
            block = level[tuple(slice(2 * c, 2 * c + 2) for c in cell)].ravel()
            if block.size == 1:
                merged[cell] = block[0]
                continue
            children.append(tuple(int(b) for b in block))
            merged[cell] = nxt
            nxt += 1
        level = merged
    return Hierarchy.build(d, children) if children else Hierarchy.flat(d)


def tokens(ids: Array, pad: int | None, offset: int = 0) -> tuple[Array, tuple[str, ...]]:
    """One group per non-pad position of a token-id sequence (positions,); pad -> -1."""
    keep = np.ones(ids.shape, bool) if pad is None else ids != pad
    index = np.full(ids.shape, NO_GROUP, np.int64)
    index[keep] = np.arange(int(keep.sum())) + offset
    labels = tuple(f"token {p}" for p in np.flatnonzero(keep))
    return index, labels
