"""Orderings of an image's sub-pixels: which variable a 1-D model sees first, second, …

An image of C channels and H×W pixels is H·W·C variables. In the *reference layout* they are
numbered raster-wise with the channel innermost: index (y·W + x)·C + c, i.e. an (H, W, C) array
flattened. An ordering is a permutation `perm` of those indices: the i-th variable a model sees
is reference index perm[i]. Pixels follow the named curve; within a pixel the channels go
R→G→B, so colour always factors as p(R) p(G|R) p(B|R,G) whatever the curve.

  raster   rows top to bottom, each left to right (PixelCNN's own order)
  snake    rows top to bottom, alternately left-to-right and right-to-left (boustrophedon):
           consecutive variables are always neighbours, unlike raster's jump at a row's end
  column   columns left to right, each top to bottom
  hilbert  a Hilbert curve over the enclosing 2^k × 2^k square, keeping the cells inside the
           image: it stays local in both directions, at the price of no simple "top half"
"""

import numpy as np

from pipeline import ArpipeError

ORDERINGS = ("raster", "snake", "column", "hilbert")


def hilbert_xy(d: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells (x, y) at distances d along the Hilbert curve of an n×n square (n a power of two);
    the classic iterative conversion, vectorised over d."""
    x = np.zeros_like(d)
    y = np.zeros_like(d)
    t = d.copy()
    s = 1
    while s < n:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        # rotate the quadrant so the sub-curves join end to start
        flip = (ry == 0) & (rx == 1)
        x = np.where(flip, s - 1 - x, x)
        y = np.where(flip, s - 1 - y, y)
        swap = ry == 0
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        x += s * rx
        y += s * ry
        t //= 4
        s *= 2
    return x, y


def pixel_order(name: str, height: int, width: int) -> np.ndarray:
    """Raster pixel indices y·W + x in the order the named curve visits them."""
    grid = np.arange(height * width).reshape(height, width)
    if name == "raster":
        return grid.ravel()
    if name == "snake":
        grid = grid.copy()
        grid[1::2] = grid[1::2, ::-1]
        return grid.ravel()
    if name == "column":
        return grid.T.ravel()
    if name == "hilbert":
        n = 1 << max(0, int(np.ceil(np.log2(max(height, width)))))
        x, y = hilbert_xy(np.arange(n * n), n)
        inside = (x < width) & (y < height)
        return y[inside] * width + x[inside]
    raise ArpipeError(f"unknown ordering {name!r}; known: {', '.join(ORDERINGS)}")


def permutation(name: str, channels: int, height: int, width: int) -> np.ndarray:
    """perm[i] = reference index (raster, channel innermost) of the i-th variable in the ordering."""
    pixels = pixel_order(name, height, width)
    return (pixels[:, None] * channels + np.arange(channels)).ravel()


def inverse(perm: np.ndarray) -> np.ndarray:
    """inv with inv[perm[i]] = i: reference layout = ordered[..., inv]."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv
