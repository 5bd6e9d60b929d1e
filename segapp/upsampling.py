"""The mask at the photo's size: the argmax of the network's logits upsampled bilinearly, to the bit.

`upsample_argmax` runs the compiled module segapp._upsampling (segapp/_upsampling.c, built by setup.py) where it
was built, else the same algorithm in NumPy; tests/test_upsampling.py checks both against a plain reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

try:
    from segapp import _upsampling
except ImportError:  # built without a C compiler: setup.py marks the module optional
    _upsampling = None

COMPILED = _upsampling is not None

# Output pixels of uncertain cells interpolated in one go by the NumPy path: bounds its temporaries to about 30 MB.
_INTERPOLATED_PER_CHUNK = 1 << 19
# Output pixels along an axis that the NumPy path works on at once: its taps cost 24 bytes an output pixel, so a
# call of any size stays bounded (the service's images have at most imaging.MAX_SIDE = 65,500 pixels a side).
_AXIS_CHUNK = 1 << 16
# A cell's class is certain when, at each of its corners, it beats every lower class by this fraction of the
# largest logit (plus the smallest normal float32, for underflow): twice the most that float32 rounding in the
# two interpolation passes can move the difference of two classes (8 units in the last place of the largest).
_CERTAIN_MARGIN = 2.0**-20
_UNDERFLOW_MARGIN = 2.0**-126
# Above this, sums could overflow and the margin argument would not hold: such logits are interpolated everywhere.
_LARGEST_CERTAIN_LOGIT = 2.0**100


@dataclass(frozen=True)
class _Taps:
    """Bilinear taps along one axis, `out` output pixels from `source` pixels: half-pixel centres, edges clamped.

    Output pixel o reads source pixels first[o] and second[o] = min(first[o] + 1, source - 1) with the float32
    weights keep[o] = 1 - weight[o] and weight[o], where position = clamp((o + 0.5) * source / out - 0.5, 0,
    source - 1) is computed in float64 and rounded to float32, first = floor(position), weight = position - first
    (segapp/_upsampling.c's `tap` computes the same). `along` makes those of output pixels start to stop - 1.
    """

    first: np.ndarray
    second: np.ndarray
    keep: np.ndarray
    weight: np.ndarray

    @classmethod
    def along(cls, out: int, source: int, start: int, stop: int) -> _Taps:
        position = np.clip((np.arange(start, stop) + 0.5) * (source / out) - 0.5, 0, source - 1).astype(np.float32)
        first = position.astype(np.intp)
        weight = position - first.astype(np.float32)  # exact: position is in [first, first + 1)
        return cls(first, np.minimum(first + 1, source - 1), np.float32(1) - weight, weight)

    def runs(self, source: int) -> _Runs:
        """The output indices whose first tap is each source index, in runs of at most ceil(len(first) / source):
        the clamped edges make the first and last source index's spans longer than the others'."""
        starts = np.searchsorted(self.first, np.arange(source), side="left")
        counts = np.searchsorted(self.first, np.arange(source), side="right") - starts
        longest = max(1, -(-len(self.first) // source))
        runs = -(-counts // longest)
        first = np.cumsum(runs) - runs
        owner = np.repeat(np.arange(source), runs)
        run_starts = starts[owner] + longest * (np.arange(len(owner)) - first[owner])
        return _Runs(first, runs, run_starts, np.minimum(longest, starts[owner] + counts[owner] - run_starts), longest)


@functools.lru_cache(maxsize=16)  # at most 1.6 MB each
def _axis(out: int, source: int, start: int, stop: int) -> tuple[_Taps, _Runs]:
    """The taps and runs of output pixels start to stop - 1 of an axis, kept for the next image of the same size
    (read only)."""
    taps = _Taps.along(out, source, start, stop)
    runs = taps.runs(source)
    for array in (*vars(taps).values(), *runs[:4]):
        array.flags.writeable = False
    return taps, runs


class _Runs(NamedTuple):
    first: np.ndarray  # per source index: its first run
    count: np.ndarray  # per source index: how many runs
    starts: np.ndarray  # per run: its first output index
    lengths: np.ndarray  # per run: how many output indices
    longest: int


def upsample_argmax(logits: np.ndarray, width: int, height: int, compiled: bool = COMPILED) -> np.ndarray:
    """Class mask at width x height: the argmax (ties to the lower class) of the logits upsampled bilinearly.

    The contract, to the bit, for finite logits: each class plane is interpolated in float32, separably and
    horizontally first, h = a[y, first_x] * keep_x + a[y, second_x] * weight_x for every source row y, then
    v = h[first_y] * keep_y + h[second_y] * weight_y, with the taps of `_Taps` (half-pixel centres, edges clamped:
    Pillow's Image.resize BILINEAR when upscaling, which sums in double precision instead); tests/test_upsampling.py
    checks it against a plain NumPy implementation of that formula.

    Upsampling the 128-px argmax instead would draw every edge as steps of width/128 pixels. Most output pixels
    need no interpolation: every operation above is monotonic with non-negative weights, so in a cell whose four
    corners have one class that beats each lower class by a margin float32 rounding cannot close, every output
    pixel has that class, and copying the low-resolution argmax is exact. Only cells along class edges (a few
    percent) are interpolated. `compiled` picks the C module (the default where it was built) or NumPy.
    """
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    source_h, source_w, _ = logits.shape
    if (source_w, source_h) == (width, height):
        return _argmax(logits)
    margin = _certain_margin(logits)
    if not compiled:
        return _upsample_argmax_numpy(logits, width, height, margin)
    if _upsampling is None:
        raise RuntimeError("segapp._upsampling was not built (no C compiler at install): pass compiled=False")
    mask = np.empty((height, width), dtype=np.uint8)
    _upsampling.upsample_argmax(mask, logits, margin is None, 0.0 if margin is None else margin)
    return mask


def _certain_margin(logits: np.ndarray) -> np.float32 | None:
    """By how much a cell's class must beat each lower class at its corners for the cell to be certain; None when
    the logits are too large (or NaN) for the argument, and every cell is interpolated."""
    largest = max(float(logits.max()), -float(logits.min()))
    if not largest < _LARGEST_CERTAIN_LOGIT:  # also NaN
        return None
    return np.float32(largest * _CERTAIN_MARGIN + _UNDERFLOW_MARGIN)


def _upsample_argmax_numpy(logits: np.ndarray, width: int, height: int, margin: np.float32 | None) -> np.ndarray:
    """`upsample_argmax` in NumPy, in blocks of at most _AXIS_CHUNK pixels a side."""
    source_h, source_w, _ = logits.shape
    low = _argmax(logits)
    uncertain = _uncertain_cells(logits, low, margin)
    mask = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, _AXIS_CHUNK):
        bottom = min(top + _AXIS_CHUNK, height)
        for left in range(0, width, _AXIS_CHUNK):
            right = min(left + _AXIS_CHUNK, width)
            rows, cols = _axis(height, source_h, top, bottom), _axis(width, source_w, left, right)
            _fill_block(mask[top:bottom, left:right], logits, low, uncertain, rows, cols)
    return mask


def _fill_block(block: np.ndarray, logits: np.ndarray, low: np.ndarray, uncertain: np.ndarray,
                row_axis: tuple[_Taps, _Runs], col_axis: tuple[_Taps, _Runs]) -> None:
    """One block of the mask, in place: the low-resolution argmax taken to the block's pixels, then the pixels of
    the uncertain cells interpolated in blocks of pixels that share their four corners."""
    (rows, row_runs), (cols, col_runs) = row_axis, col_axis
    np.take(low.take(cols.first, axis=1), rows.first, axis=0, out=block, mode="clip")  # indices are in range
    cell_rows, cell_cols = np.nonzero(uncertain & (row_runs.count[:, None] > 0) & (col_runs.count[None, :] > 0))
    # Each uncertain cell in blocks, one per pair of its row and column runs (one block but at the edges).
    across = col_runs.count[cell_cols]
    blocks = row_runs.count[cell_rows] * across
    cell = np.repeat(np.arange(len(blocks)), blocks)
    within = np.arange(len(cell)) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    block_rows = row_runs.first[cell_rows][cell] + within // across[cell]
    block_cols = col_runs.first[cell_cols][cell] + within % across[cell]
    tall, wide = row_runs.longest, col_runs.longest
    step = max(1, _INTERPOLATED_PER_CHUNK // (tall * wide))
    for start in range(0, len(cell), step):
        r, c = block_rows[start : start + step], block_cols[start : start + step]
        # Each block's output rows (tall x blocks) and columns (wide x blocks), padded to the longest run by
        # repeating its last one: the repeats compute and write the same pixel again, which costs less than
        # masking them out. Blocks run along the last axis, so NumPy's inner loops are long.
        ys = row_runs.starts[r] + np.minimum(np.arange(tall)[:, None], row_runs.lengths[r] - 1)
        xs = col_runs.starts[c] + np.minimum(np.arange(wide)[:, None], col_runs.lengths[c] - 1)
        block[ys[:, None, :], xs[None, :, :]] = _interpolated_argmax(logits, rows, cols, ys, xs)


def _uncertain_cells(logits: np.ndarray, low: np.ndarray, margin: np.float32 | None) -> np.ndarray:
    """Which cells (corners r, min(r + 1, h - 1) x c, min(c + 1, w - 1)) must be interpolated: those whose corners
    differ in class, or where a corner's class does not beat a lower class by `margin` (all, without one)."""
    if margin is None:
        return np.ones(low.shape, dtype=bool)
    height, width = low.shape
    # Padded by one row and column repeating the last, where the second tap is the first (edges clamped).
    sure = np.ones((height + 1, width + 1), dtype=bool)
    classes = np.empty((height + 1, width + 1), dtype=np.uint8)
    classes[:height, :width] = low
    if logits.shape[-1] > 1:
        planes = [logits[..., k] for k in range(logits.shape[-1])]
        winner = functools.reduce(np.maximum, planes)
        for lower, plane in enumerate(planes[:-1]):
            sure[:height, :width] &= (low <= lower) | (winner - plane > margin)
    for grid in (sure, classes):
        grid[height, :width] = grid[height - 1, :width]
        grid[:, width] = grid[:, width - 1]
    corner = classes[:-1, :-1]
    certain = sure[:-1, :-1] & sure[:-1, 1:] & sure[1:, :-1] & sure[1:, 1:]
    certain &= (classes[:-1, 1:] == corner) & (classes[1:, :-1] == corner) & (classes[1:, 1:] == corner)
    return ~certain


def _interpolated_argmax(logits: np.ndarray, rows: _Taps, cols: _Taps, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The contract's argmax at output pixels ys (tall x blocks) by xs (wide x blocks), each block's pixels sharing
    their four corners: tall x wide x blocks, uint8."""
    top, left = rows.first[ys[0]], cols.first[xs[0]]
    bottom, right = rows.second[ys[0]], cols.second[xs[0]]
    keep_x, weight_x = cols.keep[xs], cols.weight[xs]
    keep_y, weight_y = rows.keep[ys][:, None, :], rows.weight[ys][:, None, :]
    best = index = None
    for k in range(logits.shape[-1]):
        plane = logits[..., k]
        upper = plane[top, left] * keep_x + plane[top, right] * weight_x
        lower = plane[bottom, left] * keep_x + plane[bottom, right] * weight_x
        value = upper * keep_y + lower * weight_y
        if best is None:
            best, index = value, np.zeros(value.shape, dtype=np.uint8)
        else:
            np.copyto(index, np.uint8(k), where=value > best)
            if k < logits.shape[-1] - 1:
                np.maximum(best, value, out=best)
    return index


def _argmax(logits: np.ndarray) -> np.ndarray:
    """np.argmax over the last axis as uint8 (ties to the lower class); by comparisons when there are three
    classes, 3x faster than np.argmax on a last axis of length 3."""
    if logits.shape[-1] != 3:
        return np.argmax(logits, axis=-1).astype(np.uint8)
    first, second, third = logits[..., 0], logits[..., 1], logits[..., 2]
    mask = (second > first).view(np.uint8).copy()
    mask[third > np.maximum(first, second)] = 2
    return mask
