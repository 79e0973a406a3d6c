"""Chan-Vese active contours without edges, in torch, for 2D and 3D, scalar or vector images.

Model (Chan & Vese 2001; vector-valued form of Chan, Sandberg & Vese 2000), phi > 0 inside::

    E = mu * length + lambda1/C * sum_c sum (I_c - c1_c)^2 H(phi) + lambda2/C * sum_c sum (I_c - c2_c)^2 (1 - H(phi))

with c1_c, c2_c the mean of channel c inside/outside.  Each iteration is Getreuer's
semi-implicit update (IPOL 2012), applied to all voxels at once, generalised to N dimensions
and anisotropic voxels::

    phi <- (phi + dt * delta_eps(phi) * (mu * K + F)) / (1 + mu * dt * delta_eps(phi) * S)

where K and S collect the curvature stencil (neighbour values and weights, divided by the
squared relative spacing h_a^2) and F = mean_c[-lambda1 (I_c - c1_c)^2 + lambda2 (I_c - c2_c)^2].
delta_eps(z) = eps / (pi (eps^2 + z^2)) is the derivative of H_eps(z) = 1/2 (1 + 2/pi atan(z/eps)).

Mapping to ``skimage.segmentation.chan_vese`` (2D only, NumPy): skimage drops the 1/pi in
delta, so its ``dt`` equals ours divided by pi — our default ``dt = pi/2`` reproduces its
default 0.5; mu, lambda1, lambda2 and tol (RMS change of phi per iteration) mean the same;
both min-max normalise the image.  Spacing is used relative to the finest axis (h = spacing /
min(spacing)), so ``mu`` keeps skimage's pixel units while anisotropic voxels are respected.
Why our own code: skimage is 2D, single-channel and NumPy-only; SimpleITK's filter has no
vector input, no per-iteration cancel and no GPU; the deep (learned) version needs the very
same update as differentiable torch ops.

On the CPU, :func:`chan_vese` runs the same step as one fused pass per iteration through the
optional numba kernel of :mod:`.chanvese_numba` when numba is installed (``backend=``); the
torch code here stays the reference it is tested against.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, asdict
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..core.device import DeviceLike, select_device
from ..core.errors import InputError
from ..core.optional import is_available
from ..core.progress import CancelToken, ProgressCallback, check_cancel, report

_ETA = 1e-16  # keeps the curvature weights finite where phi is flat (same as Getreuer/skimage)


@dataclass
class ChanVeseParams:
    """Parameters of the classic Chan-Vese evolution (defaults match scikit-image's)."""

    mu: float = 0.25             # length (smoothness) weight
    lambda1: float = 1.0         # weight of the inside fit term
    lambda2: float = 1.0         # weight of the outside fit term
    dt: float = math.pi / 2      # time step; = skimage dt * pi (see module docstring)
    eps: float = 1.0             # width of the regularised Heaviside / delta
    max_iterations: int = 200    # iteration cap
    tolerance: float = 1e-3      # stop when the RMS change of phi per iteration falls below this
    normalize: bool = True       # min-max normalise each channel to [0, 1] first

    def validate(self) -> None:
        for name in ("mu", "lambda1", "lambda2"):
            if getattr(self, name) < 0:
                raise InputError(f"Chan-Vese parameter {name} must be >= 0, got {getattr(self, name)}")
        for name in ("dt", "eps"):
            if not getattr(self, name) > 0:
                raise InputError(f"Chan-Vese parameter {name} must be > 0, got {getattr(self, name)}")
        if int(self.max_iterations) < 1:
            raise InputError(f"max_iterations must be >= 1, got {self.max_iterations}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChanVeseResult:
    """Final level set (phi > 0 inside), iterations run and whether tolerance was reached."""

    phi: torch.Tensor
    iterations: int
    converged: bool

    @property
    def mask(self) -> torch.Tensor:
        return self.phi > 0


def heaviside(phi: torch.Tensor, eps: Union[float, torch.Tensor]) -> torch.Tensor:
    """Regularised Heaviside H_eps(z) = 1/2 (1 + 2/pi atan(z / eps))."""
    return 0.5 * (1.0 + (2.0 / math.pi) * torch.atan(phi / eps))


def dirac(phi: torch.Tensor, eps: Union[float, torch.Tensor]) -> torch.Tensor:
    """Regularised delta, the derivative of :func:`heaviside`: eps / (pi (eps^2 + z^2))."""
    return eps / (math.pi * (eps * eps + phi * phi))


def _shift_views(padded: torch.Tensor, axis: int, ndim: int):
    """(minus, plus) neighbours along spatial ``axis`` of an edge-padded tensor."""
    lead = padded.dim() - ndim
    inner = [slice(1, -1)] * ndim
    lo, hi = list(inner), list(inner)
    lo[axis] = slice(0, -2)
    hi[axis] = slice(2, None)
    prefix = [slice(None)] * lead
    return padded[tuple(prefix + lo)], padded[tuple(prefix + hi)]


def region_means(image: torch.Tensor, inside: torch.Tensor, ndim: int):
    """Per-channel means of ``image`` (B, C, *sp) weighted by ``inside`` (B, *sp) and 1 - inside."""
    dims = tuple(range(2, 2 + ndim))
    w_in = inside.unsqueeze(1)
    w_out = 1.0 - w_in
    n_in = w_in.sum(dim=dims, keepdim=True)
    n_out = w_out.sum(dim=dims, keepdim=True)
    c1 = (image * w_in).sum(dim=dims, keepdim=True) / n_in.clamp_min(1e-12)
    c2 = (image * w_out).sum(dim=dims, keepdim=True) / n_out.clamp_min(1e-12)
    return c1, c2


def chan_vese_update(phi: torch.Tensor, image: torch.Tensor, *, mu, lambda1, lambda2, dt, eps,
                     spacing: Sequence[float], soft_means: bool = False) -> torch.Tensor:
    """One semi-implicit Chan-Vese step on a batch; differentiable in every argument.

    ``phi``: (B, *spatial); ``image``: (B, C, *spatial); ``mu``... may be floats or tensors of
    shape (B,) (per-instance parameters, as the learned level set predicts them).  With
    ``soft_means`` the region means use H_eps(phi) instead of the hard phi > 0 (the deep
    version needs gradients through c1, c2).
    """
    ndim = phi.dim() - 1
    h = [float(s) for s in spacing]

    def per_batch(v):
        if torch.is_tensor(v) and v.dim() > 0:
            return v.reshape((-1,) + (1,) * ndim)
        return v

    mu, lambda1, lambda2, dt, eps = (per_batch(v) for v in (mu, lambda1, lambda2, dt, eps))
    mode_pad = F.pad(phi.unsqueeze(1), (1, 1) * ndim, mode="replicate").squeeze(1)
    minus, plus, central = [], [], []
    for a in range(ndim):
        m, p = _shift_views(mode_pad, a, ndim)
        minus.append(m)
        plus.append(p)
        central.append((p - m) / (2.0 * h[a]))
    central_sq = [c * c for c in central]
    curv = torch.zeros_like(phi)
    weight = torch.zeros_like(phi)
    for a in range(ndim):
        others = sum(central_sq[b] for b in range(ndim) if b != a) + _ETA
        inv_h2 = 1.0 / (h[a] * h[a])
        c_plus = torch.rsqrt(others + ((plus[a] - phi) / h[a]) ** 2)
        c_minus = torch.rsqrt(others + ((phi - minus[a]) / h[a]) ** 2)
        curv = curv + (plus[a] * c_plus + minus[a] * c_minus) * inv_h2
        weight = weight + (c_plus + c_minus) * inv_h2
    inside = heaviside(phi, eps if not torch.is_tensor(eps) else eps) if soft_means else (phi > 0).to(image.dtype)
    c1, c2 = region_means(image, inside, ndim)
    fit = (-lambda1 * ((image - c1) ** 2).mean(dim=1) + lambda2 * ((image - c2) ** 2).mean(dim=1))
    step = dt * dirac(phi, eps)
    return (phi + step * (mu * curv + fit)) / (1.0 + mu * step * weight)


class _FastClassicStep:
    """In-place, no-grad version of :func:`chan_vese_update` for the classic model (batch of 1).

    Same maths with far fewer memory passes: all work buffers are allocated once and reused
    (fresh multi-MB allocations cost page faults on every op), the fit term is expanded into a
    per-channel linear form and the total image sums are computed once.  A test checks that it
    matches :func:`chan_vese_update` to float precision.
    """

    def __init__(self, image: torch.Tensor, params: ChanVeseParams, spacing: Sequence[float]):
        self.image = image[0]                       # (C, *spatial)
        self.ndim = self.image.dim() - 1
        self.h = [float(s) for s in spacing]
        self.params = params
        self.channels = self.image.shape[0]
        spatial = tuple(self.image.shape[1:])
        self.image_sq_mean = (self.image * self.image).mean(dim=0)
        self.flat_image = self.image.reshape(self.channels, -1)
        self.total = self.flat_image.sum(dim=1)
        self.count = float(self.image[0].numel())
        new = lambda: torch.empty(spatial, dtype=self.image.dtype, device=self.image.device)  # noqa: E731
        # Results are written straight into the interior of two edge-padded buffers (ping-pong),
        # so the next step's neighbour views need no copy: only the one-voxel rim is refreshed.
        self.padded = [torch.empty(tuple(s + 2 for s in spatial), dtype=self.image.dtype, device=self.image.device)
                       for _ in range(2)]
        self.outputs = [buffer[(slice(1, -1),) * self.ndim] for buffer in self.padded]
        self.central_sq = [new() for _ in range(self.ndim)]
        self.others, self.c_plus, self.c_minus, self.curv, self.weight, self.step = (new() for _ in range(6))
        self.fit = new() if params.mu <= 0 else None
        self.one = torch.ones((), dtype=self.image.dtype, device=self.image.device)
        self.inside = new()
        self.eta = torch.tensor(_ETA / max(1, self.ndim - 1), dtype=self.image.dtype, device=self.image.device)
        self.eps_sq = torch.tensor(params.eps * params.eps, dtype=self.image.dtype, device=self.image.device)
        self.turn = 0

    def _fill_edges(self, interior: torch.Tensor) -> None:
        """Edge-replicate the rim of the padded buffer whose interior is ``interior``."""
        padded = self.padded[self.turn] if interior.data_ptr() == self.outputs[self.turn].data_ptr() else None
        if padded is None:
            raise RuntimeError("internal: interior does not belong to a padded buffer")
        for a in range(self.ndim):
            padded.select(a, 0).copy_(padded.select(a, 1))
            padded.select(a, -1).copy_(padded.select(a, -2))

    def _pad(self, phi: torch.Tensor) -> torch.Tensor:
        """The edge-padded buffer holding ``phi`` (copied into one if it is not already there)."""
        for turn, interior in enumerate(self.outputs):
            if phi.data_ptr() == interior.data_ptr() and phi.stride() == interior.stride():
                self.turn = turn
                return self.padded[turn]
        self.turn ^= 1
        self.outputs[self.turn].copy_(phi)
        self._fill_edges(self.outputs[self.turn])
        return self.padded[self.turn]

    def _others(self, a: int) -> torch.Tensor:
        """Sum of the other axes' squared central differences (each already holds its share of eta).

        Summed directly, not as total minus own: that difference cancels badly in float32.
        """
        rest = [self.central_sq[b] for b in range(self.ndim) if b != a]
        if len(rest) == 1:
            return rest[0]
        return torch.add(rest[0], rest[1], out=self.others) if len(rest) == 2 else sum(rest[1:], rest[0])

    def __call__(self, phi: torch.Tensor) -> torch.Tensor:
        p, ndim, h = self.params, self.ndim, self.h
        phi = phi[0]
        padded = self._pad(phi)
        minus, plus = [], []
        for a in range(ndim):
            m, pl = _shift_views(padded, a, ndim)
            minus.append(m)
            plus.append(pl)
            diff = torch.sub(pl, m, out=self.c_plus)
            torch.addcmul(self.eta, diff, diff, value=0.25 / (h[a] * h[a]), out=self.central_sq[a])
        curv, weight, c_plus, c_minus = self.curv, self.weight, self.c_plus, self.c_minus
        for a in range(ndim):
            others = self._others(a)
            inv_h2 = 1.0 / (h[a] * h[a])
            diff = torch.sub(plus[a], phi, out=c_plus)
            torch.addcmul(others, diff, diff, value=inv_h2, out=c_plus).rsqrt_()
            diff = torch.sub(phi, minus[a], out=c_minus)
            torch.addcmul(others, diff, diff, value=inv_h2, out=c_minus).rsqrt_()
            if a == 0:
                torch.mul(plus[a], c_plus, out=curv).addcmul_(minus[a], c_minus)
                torch.add(c_plus, c_minus, out=weight)
                if inv_h2 != 1.0:
                    curv.mul_(inv_h2)
                    weight.mul_(inv_h2)
            else:
                curv.addcmul_(plus[a], c_plus, value=inv_h2).addcmul_(minus[a], c_minus, value=inv_h2)
                weight.add_(c_plus, alpha=inv_h2).add_(c_minus, alpha=inv_h2)
        inside = torch.gt(phi, 0, out=self.inside)          # 1.0 / 0.0
        n_in = float(inside.sum())
        n_out = self.count - n_in
        sum_in = self.flat_image @ inside.reshape(-1)
        c1 = sum_in / n_in if n_in > 0 else torch.zeros_like(sum_in)
        c2 = (self.total - sum_in) / n_out if n_out > 0 else torch.zeros_like(sum_in)
        # mean_c[-l1 (I - c1)^2 + l2 (I - c2)^2] expanded: a * mean(I^2) + sum_c b_c I_c + const
        coef = ((2.0 / self.channels) * (p.lambda1 * c1 - p.lambda2 * c2)).tolist()
        const = float(((p.lambda2 * c2 * c2 - p.lambda1 * c1 * c1).sum()) / self.channels)
        # Semi-implicit update with delta_eps(phi) = (eps / pi) / (eps^2 + phi^2) and w = mu dt delta:
        #   new = (phi + w (curv + fit / mu)) / (1 + w weight)   -- the fit is added into curv / mu.
        k = p.dt * p.eps / math.pi
        if p.mu > 0:
            scale, target = 1.0 / p.mu, curv
        else:  # no length term: new = phi + dt delta fit
            scale, target = 1.0, self.fit.zero_()
        if p.lambda2 != p.lambda1:
            target.add_(self.image_sq_mean, alpha=(p.lambda2 - p.lambda1) * scale)
        for c in range(self.channels):
            target.add_(self.image[c], alpha=coef[c] * scale)
        target.add_(const * scale)
        w = torch.addcmul(self.eps_sq, phi, phi, out=self.step).reciprocal_().mul_(k * (p.mu if p.mu > 0 else 1.0))
        self.turn ^= 1
        out = self.outputs[self.turn]
        numerator = torch.addcmul(phi, w, target, out=target)
        if p.mu > 0:
            torch.div(numerator, torch.addcmul(self.one, w, weight, out=weight), out=out)
        else:
            out.copy_(numerator)
        self._fill_edges(out)
        return out.unsqueeze(0)


def normalize_channels(image: torch.Tensor, ndim: int) -> torch.Tensor:
    """Min-max normalise each channel of (B, C, *spatial) to [0, 1] (constant channels -> 0)."""
    dims = tuple(range(2, 2 + ndim))
    lo = image.amin(dim=dims, keepdim=True)
    shifted = image - lo
    hi = shifted.amax(dim=dims, keepdim=True)
    return torch.where(hi > 0, shifted / torch.where(hi > 0, hi, torch.ones_like(hi)), shifted)


def chan_vese(image: Union[np.ndarray, torch.Tensor], phi0: Union[np.ndarray, torch.Tensor],
              params: Optional[ChanVeseParams] = None, *, spacing: Optional[Sequence[float]] = None,
              device: DeviceLike = None, progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelToken] = None, backend: str = "auto") -> ChanVeseResult:
    """Evolve ``phi0`` on ``image`` with the classic Chan-Vese model.

    ``phi0`` has the spatial shape (2D or 3D); ``image`` has the same shape, or one more
    leading axis of channels (vector-valued Chan-Vese).  ``spacing`` is per array axis
    (e.g. (z, y, x) mm) and is used relatively.  Returns phi on the chosen device.
    ``backend``: ``"torch"`` (the reference, any device), ``"numba"`` (fused CPU kernel of
    :mod:`.chanvese_numba`, needs the optional package numba) or ``"auto"``: numba on the CPU
    when it is installed, else torch; the environment variable ``DEEPIMAGING_CHANVESE_BACKEND``
    overrides ``"auto"``.
    """
    params = params or ChanVeseParams()
    params.validate()
    dev = select_device(device)
    phi = torch.as_tensor(np.asarray(phi0) if not torch.is_tensor(phi0) else phi0).to(dev, torch.float32)
    img = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image).to(dev, torch.float32)
    ndim = phi.dim()
    if ndim not in (2, 3):
        raise InputError(f"Chan-Vese needs a 2D or 3D level set, got shape {tuple(phi.shape)}")
    if img.dim() == ndim:
        img = img.unsqueeze(0)
    if img.dim() != ndim + 1 or tuple(img.shape[1:]) != tuple(phi.shape):
        raise InputError(f"image shape {tuple(img.shape)} does not match level set shape {tuple(phi.shape)}")
    if not torch.isfinite(img).all():
        raise InputError("the image has NaN or infinite values")
    spacing = tuple(spacing) if spacing is not None else (1.0,) * ndim
    if len(spacing) != ndim or min(spacing) <= 0:
        raise InputError(f"spacing {spacing} must have {ndim} positive values")
    rel = tuple(float(s) / min(spacing) for s in spacing)

    img = img.unsqueeze(0)
    if params.normalize:
        img = normalize_channels(img, ndim)
    evolve = _numba_evolve(strict=backend != "auto") if _resolve_backend(backend, dev) == "numba" else None
    if evolve is not None:
        return _chan_vese_numba(evolve, img[0], phi, params, rel, progress, cancel)
    phi = phi.unsqueeze(0)
    check_every = 1 if dev.type == "cpu" else 10
    step = _FastClassicStep(img, params, rel)
    converged = False
    it = 0
    # Flat regions make squared differences subnormal; x86 CPUs run those 10-20x slower.
    flush = torch.set_flush_denormal(True)
    try:
        with torch.no_grad():
            while it < params.max_iterations:
                check_cancel(cancel)
                old = phi if (it + 1) % check_every == 0 or it + 1 == params.max_iterations else None
                phi = step(phi)
                it += 1
                if old is not None:
                    change = torch.dist(phi, old).item() / math.sqrt(phi.numel())  # RMS change
                    report(progress, it / params.max_iterations, f"iteration {it}, change {change:.2e}")
                    if change <= params.tolerance:
                        converged = True
                        break
    finally:
        if flush:
            torch.set_flush_denormal(False)
    report(progress, 1.0, f"done after {it} iterations")
    return ChanVeseResult(phi[0], it, converged)


_BACKENDS = ("auto", "torch", "numba")


def _resolve_backend(backend: str, dev: torch.device) -> str:
    """``"torch"`` or ``"numba"`` for a :func:`chan_vese` call (see its docstring)."""
    if backend == "auto":
        backend = os.environ.get("DEEPIMAGING_CHANVESE_BACKEND", "auto").strip().lower() or "auto"
    if backend not in _BACKENDS:
        raise InputError(f"unknown Chan-Vese backend {backend!r}: use one of {', '.join(_BACKENDS)}")
    if backend == "auto":
        return "numba" if dev.type == "cpu" and is_available("numba") else "torch"
    if backend == "numba" and dev.type != "cpu":
        raise InputError(f"the numba Chan-Vese backend runs on the CPU only, not on {dev}")
    return backend


def _numba_evolve(strict: bool) -> Optional[Callable]:
    """``chanvese_numba.evolve``; if numba fails to import: the error when ``strict``, else a warning and None."""
    try:
        from .chanvese_numba import evolve  # optional dependency, imported only here
    except ImportError as error:  # e.g. a numba built for another numpy
        if strict:
            raise
        warnings.warn(f"numba is installed but unusable ({error}); Chan-Vese runs on the torch path")
        return None
    return evolve


def _chan_vese_numba(evolve: Callable, img: torch.Tensor, phi: torch.Tensor, params: ChanVeseParams,
                     rel: Sequence[float], progress: Optional[ProgressCallback],
                     cancel: Optional[CancelToken]) -> ChanVeseResult:
    """The CPU loop of :func:`chan_vese` on the fused numba kernel (same stopping rule and reports)."""

    def on_iteration(it: int, change: float) -> bool:
        report(progress, it / params.max_iterations, f"iteration {it}, change {change:.2e}")
        if change <= params.tolerance:
            return True
        if it < params.max_iterations:  # checked before each step, as in the torch loop
            check_cancel(cancel)
        return False

    check_cancel(cancel)
    out, it, converged = evolve(img.detach().numpy(), phi.detach().numpy(), params, rel, on_iteration,
                                threads=torch.get_num_threads())
    report(progress, 1.0, f"done after {it} iterations")
    return ChanVeseResult(torch.from_numpy(out), it, converged)


def default_level_set(shape: Sequence[int], kind: str = "checkerboard", square: int = 5) -> np.ndarray:
    """Mask-free initial level sets (2D or 3D): ``checkerboard`` (Getreuer's fast-converging
    sin-product pattern, as in scikit-image) or ``disk``/``ball`` (centred, radius 1/4 of the
    smallest side, as a signed distance in voxels)."""
    shape = tuple(int(s) for s in shape)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    if kind == "checkerboard":
        phi = np.ones(shape)
        for g in grids:
            phi = phi * np.sin(math.pi / square * g)
        return phi.astype(np.float32)
    if kind in ("disk", "ball"):
        centre = [(s - 1) / 2.0 for s in shape]
        radius = min(shape) / 4.0
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
        return (radius - dist).astype(np.float32)
    raise InputError(f"unknown initial level set {kind!r}: use 'checkerboard' or 'disk'")
