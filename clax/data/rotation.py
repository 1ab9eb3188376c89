"""Image rotation for rotated-domain scenarios: a sparse bilinear resampling matrix.

Rotating 60k 28x28 images with ``scipy.ndimage.rotate`` takes seconds per angle; one
sparse matrix per (shape, angle) applied to all images at once matches it (bilinear,
``reshape=False``) at a fraction of the cost.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse


def _rotation_matrix(height: int, width: int, angle: float) -> scipy.sparse.csr_matrix:
    """The (H*W, H*W) bilinear-interpolation matrix rotating an image about its centre.

    Row ``i * W + j`` holds the weights of the (up to 4) source pixels of output pixel
    (i, j). Source points outside the image give 0, as ``scipy.ndimage.rotate`` with
    ``order=1, mode="constant"`` does.
    """
    theta = np.deg2rad(angle)
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    ii, jj = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    di, dj = (ii - cy).ravel(), (jj - cx).ravel()
    # Inverse map: output (i, j) reads input (si, sj); positive angles turn the image
    # counter-clockwise as displayed (row 0 at the top), like np.rot90.
    si = np.cos(theta) * di + np.sin(theta) * dj + cy
    sj = -np.sin(theta) * di + np.cos(theta) * dj + cx
    eps = 1e-6  # Grid points that land on the border only up to rounding stay inside.
    inside = (si >= -eps) & (si <= height - 1 + eps) & (sj >= -eps) & (sj <= width - 1 + eps)
    si, sj = np.clip(si, 0, height - 1), np.clip(sj, 0, width - 1)
    i0, j0 = np.floor(si).astype(np.int64), np.floor(sj).astype(np.int64)
    fi, fj = si - i0, sj - j0
    out = np.arange(height * width)
    rows, cols, vals = [], [], []
    for oi, oj, weight in ((0, 0, (1 - fi) * (1 - fj)), (1, 0, fi * (1 - fj)),
                           (0, 1, (1 - fi) * fj), (1, 1, fi * fj)):
        a, b = i0 + oi, j0 + oj
        ok = inside & (a < height) & (b < width) & (weight > 0)
        rows.append(out[ok])
        cols.append((a * width + b)[ok])
        vals.append(weight[ok])
    return scipy.sparse.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(height * width, height * width),
    )


def rotate_images(x: np.ndarray, angle: float) -> np.ndarray:
    """Rotates (N, H, W, C) images by ``angle`` degrees about their centres.

    Positive angles turn the images counter-clockwise as displayed (row 0 at the top), so
    ``rotate_images(x, 90)`` equals ``np.rot90(x, 1, axes=(1, 2))`` for square images.
    Matches ``scipy.ndimage.rotate(x, angle, axes=(1, 2), reshape=False, order=1)`` (to
    float32 rounding): bilinear, zeros outside. Done as sparse matrix products over blocks
    of images (about 0.3-0.5 s for 60k 28x28 images, ~10x faster than scipy).

    Args:
        x: float images (N, H, W, C).
        angle: degrees.

    Returns:
        float32 rotated images, same shape.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be (N, H, W, C) images, got shape {x.shape}")
    n, h, w, c = x.shape
    if float(angle) % 360.0 == 0.0:
        return x.astype(np.float32, copy=True)
    m = _rotation_matrix(h, w, float(angle))
    if c > 1:  # Same weights for every channel: (pixel, channel) index = pixel * C + channel.
        m = scipy.sparse.kron(m, scipy.sparse.identity(c, np.float32, format="csr"), "csr")
    flat = x.reshape(n, h * w * c).astype(np.float32, copy=False)
    out = np.empty_like(flat)
    # Blocks of ~2 MB: the sparse product's transposes stay in cache (whole-array products
    # come back Fortran-ordered and cost a slow 2x-memory transposing copy).
    block = max(1, (2 << 20) // (4 * flat.shape[1]))
    for start in range(0, n, block):
        out[start : start + block] = (m @ flat[start : start + block].T).T
    return out.reshape(n, h, w, c)
