"""Which players a request has: the modality of the model's inputs, and the feature groups of
one row (tabular columns or configured blocks, an image's grid of patches, a text's tokens, or a
client's own mask). Decisions only; the groups themselves are explainers.groups.Groups."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from explainers.base import Array
from explainers.errors import InvalidArgument
from explainers.groups import NO_GROUP, Groups, Hierarchy, grid, quadtree, tokens
from service.models.inputs import Layout, Modality

GRID_CHOICES = (8, 4, 2, 1)  # patches per spatial axis tried by the default, largest first
MAX_GROUPS = 4096  # players a request may form (masks, patches, tokens)


@dataclass(frozen=True)
class GroupRequest:
    """A request's wishes about groups (all optional)."""

    mask: Array | None = None  # (elements of one input,) or the input's shape
    input: str = ""
    labels: tuple[str, ...] = ()
    patch: tuple[int, ...] = ()
    grid: tuple[int, ...] = ()
    hierarchy: tuple[tuple[int, ...], ...] = ()

    @property
    def empty(self) -> bool:
        return self.mask is None and not self.patch and not self.grid and not self.hierarchy


def column_groups(names: Sequence[str], blocks: Sequence[tuple[str, Sequence[str]]] = ()
                  ) -> Groups:
    """Tabular players: one per column, except configured blocks (a one-hot encoding, say),
    which become one player each, in the order of their first column."""
    if not blocks:
        return Groups.columns(names)
    owner = np.full(len(names), NO_GROUP)
    position = {n: j for j, n in enumerate(names)}
    for b, (label, members) in enumerate(blocks):
        for m in members:
            if m not in position:
                raise InvalidArgument(f"groups: block {label!r} names unknown feature {m!r}")
            if owner[position[m]] != NO_GROUP:
                raise InvalidArgument(f"groups: feature {m!r} is in two blocks")
            owner[position[m]] = b
    return _order_blocks(names, owner, [label for label, _ in blocks])


def _order_blocks(names: Sequence[str], owner: Array, labels: list[str]) -> Groups:
    ids = np.empty(len(names), np.int64)
    out_labels: list[str] = []
    seen: dict[tuple[str, int], int] = {}
    for j, name in enumerate(names):
        key = ("block", int(owner[j])) if owner[j] != NO_GROUP else ("column", j)
        if key not in seen:
            seen[key] = len(out_labels)
            out_labels.append(labels[int(owner[j])] if key[0] == "block" else name)
        ids[j] = seen[key]
    return Groups.build(ids, out_labels)


def image_groups(layout: Layout, modality: Modality, cells: Sequence[int],
                 hierarchy: Hierarchy | None = None) -> tuple[Groups, str]:
    """A grid of patches over the image input (every channel of a patch together); other
    inputs keep x's values. Returns the groups and a description."""
    k = modality.input
    shape = layout.shapes[k]
    axes = modality.spatial_axes(len(shape))
    if len(axes) != len(cells):
        cells = tuple(cells[:1]) * len(axes)
    ids, labels, counts = grid(shape, axes, cells)
    index = _place(layout, k, ids)
    h = hierarchy or quadtree(counts)
    sizes = [shape[a] // c for a, c in zip(axes, counts, strict=True)]
    what = (f"{' x '.join(map(str, counts))} grid of {' x '.join(map(str, sizes))}-pixel "
            f"patches of input {layout.specs[k].name!r}")
    return Groups.build(index, labels, h), what


def cells_for(layout: Layout, modality: Modality, patch: Sequence[int] = (),
              cells: Sequence[int] = (), fits: Callable[[int], bool] | None = None
              ) -> tuple[int, ...]:
    """Patches per spatial axis: from a patch size, a grid, or the largest default grid whose
    player count the method can afford (`fits(d)`)."""
    shape = layout.shapes[modality.input]
    axes = modality.spatial_axes(len(shape))
    dims = [shape[a] for a in axes]
    if patch:
        sizes = list(patch) * len(dims) if len(patch) == 1 else list(patch)
        if len(sizes) != len(dims) or any(s < 1 for s in sizes):
            raise InvalidArgument(f"groups.patch: one size >= 1 per spatial axis {dims}")
        return tuple(-(-d // s) for d, s in zip(dims, sizes, strict=True))
    if cells:
        wanted = list(cells) * len(dims) if len(cells) == 1 else list(cells)
        if len(wanted) != len(dims) or any(not 1 <= c <= d for c, d in
                                           zip(wanted, dims, strict=True)):
            raise InvalidArgument(f"groups.grid: one count in 1..size per spatial axis {dims}")
        return tuple(wanted)
    for n in GRID_CHOICES:
        counts = tuple(min(n, d) for d in dims)
        if fits is None or fits(math.prod(counts)):
            return counts
    return tuple(1 for _ in dims)


def token_groups(layout: Layout, modality: Modality, row: Array, pad: int | None,
                 vocabulary: Sequence[str] = (), hierarchy: Hierarchy | None = None
                 ) -> tuple[Groups, str]:
    """One group per non-pad token of the token input; labels name the word and position."""
    k = modality.input
    a, b = layout.offsets[k], layout.offsets[k + 1]
    ids = row[a:b].astype(np.int64)
    local, _ = tokens(ids, pad)
    if not np.any(local >= 0):
        raise InvalidArgument(f"inputs[{k}]: every position is padding: nothing to explain")
    labels = tuple(f"{_word(int(ids[p]), vocabulary)} @{p}" for p in np.flatnonzero(local >= 0))
    groups = Groups.build(_place(layout, k, local), labels,
                          hierarchy or halves(len(labels)))
    return groups, f"one group per non-pad token of input {layout.specs[k].name!r}"


def _word(token: int, vocabulary: Sequence[str]) -> str:
    return vocabulary[token] if 0 <= token < len(vocabulary) else str(token)


def halves(d: int) -> Hierarchy:
    """A balanced binary tree over positions 0..d-1 (spans split in halves), for text."""
    if d < 2:
        return Hierarchy(d, ())  # one token: nothing to split (partition refuses one group)
    children: list[tuple[int, ...]] = []

    def build(lo: int, hi: int) -> int:
        if hi - lo == 1:
            return lo
        mid = (lo + hi) // 2
        left, right = build(lo, mid), build(mid, hi)
        children.append((left, right))
        return d + len(children) - 1

    build(0, d)
    return Hierarchy.build(d, children)


def mask_groups(layout: Layout, request: GroupRequest) -> tuple[Groups, str]:
    """A client's mask of group ids over one input (e.g. superpixels), used as given."""
    assert request.mask is not None
    k = layout.input_of(request.input)
    shape = layout.shapes[k]
    mask = np.asarray(request.mask)
    if mask.shape[:1] == (1,) and mask.shape[1:] == shape:
        mask = mask[0]
    if mask.shape != shape and mask.shape != (math.prod(shape),):
        raise InvalidArgument(f"groups.mask.shape: {list(mask.shape)}; input "
                              f"{layout.specs[k].name!r} has shape {list(shape)} per row")
    if mask.dtype.kind not in "iu":
        raise InvalidArgument("groups.mask.datatype: must be INT32 or INT64 group ids")
    if mask.size and int(mask.max()) >= MAX_GROUPS:
        raise InvalidArgument(f"groups.mask: {int(mask.max()) + 1} groups; at most {MAX_GROUPS}")
    hierarchy = _hierarchy(request, int(mask.max()) + 1) if request.hierarchy else None
    groups = Groups.build(_place(layout, k, mask.ravel().astype(np.int64)),
                          request.labels or None, hierarchy, field="groups.mask")
    return groups, f"request mask ({groups.size} groups) over input {layout.specs[k].name!r}"


def _hierarchy(request: GroupRequest, d: int) -> Hierarchy:
    return Hierarchy.build(d, request.hierarchy)


def _place(layout: Layout, k: int, ids: Array) -> Array:
    """Group ids of input k's elements in the full flat row; every other input: no group."""
    index = np.full(layout.elements, NO_GROUP, np.int64)
    index[layout.offsets[k]:layout.offsets[k + 1]] = ids
    return index
