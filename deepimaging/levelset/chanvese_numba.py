"""Optional fused CPU kernel for classic Chan-Vese, compiled with numba (imported lazily).

The torch code in :mod:`deepimaging.levelset.chanvese` is the reference; this module computes
the very same semi-implicit Getreuer step (same stencil, spacing, eta, delta and update) but in
one pass over the image per iteration: each voxel reads its 2 * ndim neighbours, computes the
curvature weights, the fit term and the update, writes the new phi and accumulates, per row,
what the next iteration needs (voxels inside, per-channel image sums inside, squared change).
The torch path needs about 35 memory passes per iteration for the same work.

Rows are spread over threads with ``numba.prange`` (as many as torch uses); per-row partial
sums are added up in a fixed order, so results do not depend on the thread count.  The
kernels are compiled on first use (a few seconds) and cached on disk next to this file or in
numba's user cache (``NUMBA_CACHE_DIR``), so later processes load them in well under a second.
Inside 3D Slicer, ``slicer.util.pip_install("numba")`` enables it; without numba the torch path
runs.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from ..core.optional import import_optional

numba = import_optional("numba", "numba", "The fast Chan-Vese CPU kernel")
prange = numba.prange
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    # numba's own thread pool sleeps between kernels; the OpenMP one spins, and next to torch's
    # OpenMP pool on a busy machine that made 2-thread runs up to 10x slower than 1 thread.
    numba.config.THREADING_LAYER = "workqueue"

_ETA = 1e-16          # same as chanvese._ETA: keeps the curvature weights finite where phi is flat
_ONE = np.float32(1.0)  # float32 constant: a Python 1 would promote the stencil to float64
_LOCK = threading.Lock()  # numba's workqueue threading layer must not be entered by two threads at once


def _jit(**options) -> Callable:
    """``numba.njit`` with an on-disk cache where one is writable (else compile each process)."""
    def decorate(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # no writable cache location
            return numba.njit(cache=False, **options)(fn)
    return decorate


def _kernel(fn):
    """Helpers of the step kernels: float32 fast maths, no Python division checks (they block SIMD)."""
    return numba.njit(fastmath=True, error_model="numpy")(fn)


@_kernel
def _voxel2(c, ym, yp, xm, xp, fit, k):
    """New phi of one 2D voxel from its value ``c``, neighbours and fit term; ``k`` holds constants."""
    qy, qx, iy, ix, eta, mu, kd, eps2 = k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]
    gy = yp - ym
    gx = xp - xm
    oy = gx * gx * qx + eta           # the other axis' squared central difference (+ eta), for y
    ox = gy * gy * qy + eta
    d = yp - c
    cp = _ONE / math.sqrt(oy + d * d * iy)
    d = c - ym
    cm = _ONE / math.sqrt(oy + d * d * iy)
    curv = (yp * cp + ym * cm) * iy
    wgt = (cp + cm) * iy
    d = xp - c
    cp = _ONE / math.sqrt(ox + d * d * ix)
    d = c - xm
    cm = _ONE / math.sqrt(ox + d * d * ix)
    curv += (xp * cp + xm * cm) * ix
    wgt += (cp + cm) * ix
    step = kd / (eps2 + c * c)        # dt * delta_eps(phi)
    return (c + step * (mu * curv + fit)) / (_ONE + mu * step * wgt)


@_kernel
def _voxel3(c, zm, zp, ym, yp, xm, xp, fit, k):
    """New phi of one 3D voxel (see :func:`_voxel2`)."""
    qz, qy, qx, iz, iy, ix, eta, mu, kd, eps2 = k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7], k[8], k[9]
    gz = zp - zm
    gy = yp - ym
    gx = xp - xm
    sz = gz * gz * qz
    sy = gy * gy * qy
    sx = gx * gx * qx
    oz = sy + sx + eta
    oy = sz + sx + eta
    ox = sz + sy + eta
    d = zp - c
    cp = _ONE / math.sqrt(oz + d * d * iz)
    d = c - zm
    cm = _ONE / math.sqrt(oz + d * d * iz)
    curv = (zp * cp + zm * cm) * iz
    wgt = (cp + cm) * iz
    d = yp - c
    cp = _ONE / math.sqrt(oy + d * d * iy)
    d = c - ym
    cm = _ONE / math.sqrt(oy + d * d * iy)
    curv += (yp * cp + ym * cm) * iy
    wgt += (cp + cm) * iy
    d = xp - c
    cp = _ONE / math.sqrt(ox + d * d * ix)
    d = c - xm
    cm = _ONE / math.sqrt(ox + d * d * ix)
    curv += (xp * cp + xm * cm) * ix
    wgt += (cp + cm) * ix
    step = kd / (eps2 + c * c)
    return (c + step * (mu * curv + fit)) / (_ONE + mu * step * wgt)


@_kernel
def _fit_row(img, sq, r0, r1, fit_a, fit_b, fit_c, out):
    """Fit term of one row: fit_a * mean_c I_c^2 + sum_c fit_b[c] I_c + fit_c (into ``out``)."""
    n = out.shape[0]
    if fit_a != 0:
        for j in range(n):
            out[j] = fit_c + fit_a * sq[r0, r1, j]
    else:
        for j in range(n):
            out[j] = fit_c
    for ch in range(img.shape[0]):
        b = fit_b[ch]
        for j in range(n):
            out[j] += b * img[ch, r0, r1, j]


@_kernel
def _row_sums(img, r0, r1, new, old, partials, r):
    """Row ``r``'s share of the next region means and of the squared change: [n_in, sum_c..., change]."""
    n = new.shape[0]
    count = 0.0
    change = 0.0
    for j in range(n):
        count += 1.0 if new[j] > 0 else 0.0
        d = np.float64(new[j] - old[j])
        change += d * d
    partials[r, 0] = count
    channels = img.shape[0]
    for ch in range(channels):
        s = 0.0
        for j in range(n):
            s += np.float64(img[ch, r0, r1, j]) if new[j] > 0 else 0.0
        partials[r, 1 + ch] = s
    partials[r, 1 + channels] = change


@_kernel
def _rows(phi, out, img, sq, fit_a, fit_b, fit_c, k, partials, first, stop):
    """Update rows ``first``..``stop - 1`` (row r = z * ny + y) of (nz, ny, nx) ``phi`` into ``out``.

    2D arrives as nz == 1 and has no z term.  Writes each row's sums into ``partials``.
    """
    nz, ny, nx = phi.shape
    fit = np.empty(nx, dtype=phi.dtype)
    pad = np.empty(nx + 2, dtype=phi.dtype)   # the row with its ends replicated: one loop, no edge cases
    for r in range(first, stop):
        z = r // ny
        y = r - z * ny
        zm = phi[max(z - 1, 0), y]
        zp = phi[min(z + 1, nz - 1), y]
        ym = phi[z, max(y - 1, 0)]
        yp = phi[z, min(y + 1, ny - 1)]
        row = phi[z, y]
        dst = out[z, y]
        _fit_row(img, sq, z, y, fit_a, fit_b, fit_c, fit)
        pad[1:nx + 1] = row
        pad[0] = row[0]
        pad[nx + 1] = row[nx - 1]
        if nz == 1:
            for x in range(nx):
                dst[x] = _voxel2(pad[x + 1], ym[x], yp[x], pad[x], pad[x + 2], fit[x], k)
        else:
            for x in range(nx):
                dst[x] = _voxel3(pad[x + 1], zm[x], zp[x], ym[x], yp[x], pad[x], pad[x + 2], fit[x], k)
        _row_sums(img, z, y, dst, row, partials, r)


@_jit(parallel=True, fastmath=True, error_model="numpy")
def _step_parallel(phi, out, img, sq, fit_a, fit_b, fit_c, k, partials):  # pragma: no cover - compiled
    """One Chan-Vese step, blocks of rows spread over numba's threads."""
    rows = phi.shape[0] * phi.shape[1]
    blocks = min(rows, 64)
    for b in prange(blocks):
        _rows(phi, out, img, sq, fit_a, fit_b, fit_c, k, partials, b * rows // blocks, (b + 1) * rows // blocks)


@_jit(fastmath=True, error_model="numpy")
def _step_serial(phi, out, img, sq, fit_a, fit_b, fit_c, k, partials):  # pragma: no cover - compiled
    """One Chan-Vese step on the calling thread (no thread-pool round trip: small images, 1 thread)."""
    _rows(phi, out, img, sq, fit_a, fit_b, fit_c, k, partials, 0, phi.shape[0] * phi.shape[1])


# Below this many voxels a parallel launch (tens of microseconds) costs more than it saves.
PARALLEL_MIN_VOXELS = 1 << 17


class NumbaClassicStep:
    """Fused-kernel equivalent of ``chanvese._FastClassicStep`` for numpy arrays on the CPU.

    ``image``: (C, *spatial) float32, already normalised; ``spacing``: relative (min 1).
    Call it with phi (*spatial) float32; it returns the new phi (a buffer it owns, reused every
    other call) and the RMS change of phi.
    """

    def __init__(self, image: np.ndarray, phi0: np.ndarray, params, spacing: Sequence[float], parallel: bool = True):
        ndim = phi0.ndim
        self.parallel = parallel
        shape3 = (1,) * (3 - ndim) + tuple(phi0.shape)
        self.image = np.ascontiguousarray(image, dtype=np.float32).reshape((image.shape[0],) + shape3)
        self.channels = self.image.shape[0]
        self.params = params
        self.count = float(phi0.size)
        if params.lambda2 != params.lambda1:
            self.sq = (self.image.astype(np.float64) ** 2).mean(axis=0).astype(np.float32)
        else:  # never read: the kernel skips the quadratic term when its coefficient is 0
            self.sq = np.zeros((1, 1, 1), dtype=np.float32)
        self.total = self.image.reshape(self.channels, -1).sum(axis=1, dtype=np.float64).tolist()
        self.fit_b = np.zeros(self.channels, dtype=np.float32)
        self.buffers = [np.empty(shape3, dtype=np.float32) for _ in range(2)]
        self.turn = 0
        self.partials = np.zeros((shape3[0] * shape3[1], self.channels + 2), dtype=np.float64)
        h = [1.0] * (3 - ndim) + [float(s) for s in spacing]
        inv_h2 = [1.0 / (s * s) for s in h]
        quarter = [0.25 * v for v in inv_h2]
        eta = _ETA
        kd = params.dt * params.eps / math.pi
        tail = [eta, params.mu, kd, params.eps * params.eps]
        constants = quarter[1:] + inv_h2[1:] + tail if ndim == 2 else quarter + inv_h2 + tail
        self.k = np.array(constants, dtype=np.float32)
        inside = phi0 > 0
        self.n_in = float(inside.sum())
        self.sum_in = [float(self.image[c].reshape(-1)[inside.reshape(-1)].sum(dtype=np.float64))
                       for c in range(self.channels)]

    def _fit(self) -> Tuple[np.float32, np.ndarray, np.float32]:
        """Coefficients of mean_c[-l1 (I_c - c1_c)^2 + l2 (I_c - c2_c)^2] = a mean_c I_c^2 + sum_c b_c I_c + const.

        Plain Python floats: for a few channels that is several times faster than small numpy ops.
        """
        p, n_in = self.params, self.n_in
        n_out = self.count - n_in
        b, const = [], 0.0
        for total, inside in zip(self.total, self.sum_in):
            c1 = inside / n_in if n_in > 0 else 0.0
            c2 = (total - inside) / n_out if n_out > 0 else 0.0
            b.append((2.0 / self.channels) * (p.lambda1 * c1 - p.lambda2 * c2))
            const += (p.lambda2 * c2 * c2 - p.lambda1 * c1 * c1) / self.channels
        self.fit_b[:] = b
        return np.float32(p.lambda2 - p.lambda1), self.fit_b, np.float32(const)

    def __call__(self, phi: np.ndarray) -> Tuple[np.ndarray, float]:
        src = np.ascontiguousarray(phi, dtype=np.float32).reshape(self.buffers[0].shape)
        if np.may_share_memory(src, self.buffers[self.turn]):
            self.turn ^= 1
        out = self.buffers[self.turn]
        fit_a, fit_b, fit_c = self._fit()
        kernel = _step_parallel if self.parallel else _step_serial
        kernel(src, out, self.image, self.sq, fit_a, fit_b, fit_c, self.k, self.partials)
        totals = self.partials.sum(axis=0).tolist()
        self.n_in = totals[0]
        self.sum_in = totals[1:1 + self.channels]
        change = math.sqrt(totals[-1] / self.count)
        self.turn ^= 1
        return out.reshape(phi.shape), change


def evolve(image: np.ndarray, phi0: np.ndarray, params, spacing: Sequence[float],
           on_iteration: Callable[[int, float], bool], threads: Optional[int] = None) -> Tuple[np.ndarray, int, bool]:
    """Run up to ``params.max_iterations`` fused steps; ``on_iteration(it, change)`` returns True to stop.

    ``threads`` caps numba's threads (default: all numba has); with one thread, or an image
    under :data:`PARALLEL_MIN_VOXELS`, the serial kernel runs.  Returns (phi, iterations, stopped).
    """
    limit = numba.config.NUMBA_NUM_THREADS
    threads = limit if threads is None else max(1, min(int(threads), limit))
    parallel = threads > 1 and phi0.size >= PARALLEL_MIN_VOXELS
    step = NumbaClassicStep(image, phi0, params, spacing, parallel=parallel)
    phi = np.ascontiguousarray(phi0, dtype=np.float32)
    with _LOCK:
        previous = numba.get_num_threads() if parallel else None
        try:
            if parallel:
                numba.set_num_threads(threads)
            for it in range(1, int(params.max_iterations) + 1):
                phi, change = step(phi)
                if on_iteration(it, change):
                    return phi, it, True
        finally:
            if previous is not None:
                numba.set_num_threads(previous)
    return phi, int(params.max_iterations), False  # a buffer of ``step``, which is dropped now
