"""Z-Net (Feng et al., Optica 9(3) 264, 2022): MRI-guided NIRST reconstruction network.

Inputs are the boundary amplitudes of a circular array of ``n_optodes`` optodes (each a source
in turn, the other ``n_optodes - 1`` detectors) at ``n_wavelengths`` wavelengths, plus the MRI
image of the same plane; the output is a (3, H, W) map of HbO, Hb and water.

Measurement ordering (the flat vector every part of ``deepimaging.nirst`` uses) is
source-major::

    index = ((w * n_src) + s) * (n_src - 1) + d_rank

for wavelength ``w``, source optode ``s`` and detector rank ``d_rank``, where for each source
the ``n_src - 1`` detectors are the other optodes in increasing optode index (so detector
optode ``d = d_rank + (d_rank >= s)``).  16 optodes x 15 detectors x 9 wavelengths = 2160.

Network input layout (a choice; the paper only says the convolutions act on the signal
vector ``s``): ``arrange_measurements`` turns the flat vector into a ``(n_wavelengths, n, n)``
image per sample, row = source ``s``, column = optode offset ``k = (d - s) mod n`` along the ring.
Column 0 (source = detector, not measured) is zero, i.e. the normalised mean.  In this layout
each row has the same geometry, rotating the object by one optode rolls the rows, both axes wrap
around the ring, so the first two 3x3 convolutions pad circularly.  Wavelengths are channels.

Normalisation contract (``MeasurementNormalizer``): log-amplitude minus the log-amplitude of a
homogeneous reference (removes the source-detector distance decay and coupling), then
standardised per wavelength channel with training-set mean/std.  Its ``state_dict`` holds
tensors only, so it can travel in a checkpoint's ``extra_tensors``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_OPTODES = 16
N_WAVELENGTHS = 9


def n_measurements(n_optodes: int = N_OPTODES, n_wavelengths: int = N_WAVELENGTHS) -> int:
    """Length of the flat measurement vector."""
    return n_wavelengths * n_optodes * (n_optodes - 1)


def infer_n_optodes(length: int, n_wavelengths: int = N_WAVELENGTHS) -> int:
    """Optode count ``n`` with ``n_wavelengths * n * (n - 1) == length``; raises if none."""
    per_wl, rem = divmod(length, n_wavelengths)
    n = int(round((1 + math.sqrt(1 + 4 * per_wl)) / 2)) if per_wl > 0 else 0
    if rem or n < 3 or n * (n - 1) != per_wl:
        raise ValueError(f"{length} measurements is not n_wavelengths={n_wavelengths} x n x (n-1)")
    return n


def _offset_index(n_optodes: int) -> Tuple[Tensor, Tensor]:
    """For each (source, offset) cell of the n x n grid: flat per-wavelength index and validity."""
    src = torch.arange(n_optodes).view(-1, 1).expand(n_optodes, n_optodes)
    off = torch.arange(n_optodes).view(1, -1).expand(n_optodes, n_optodes)
    det = (src + off) % n_optodes
    rank = det - (det > src).long()
    valid = off != 0
    index = torch.where(valid, src * (n_optodes - 1) + rank, torch.zeros_like(src))
    return index.reshape(-1), valid.reshape(-1)


def arrange_measurements(x: Tensor, n_optodes: Optional[int] = None,
                         n_wavelengths: int = N_WAVELENGTHS) -> Tensor:
    """(B, W*n*(n-1)) source-major vector -> (B, W, n, n) source x offset image (see module doc)."""
    if x.dim() != 2:
        raise ValueError(f"expected (B, n_measurements), got shape {tuple(x.shape)}")
    n = n_optodes or infer_n_optodes(x.shape[1], n_wavelengths)
    if x.shape[1] != n_measurements(n, n_wavelengths):
        raise ValueError(f"{x.shape[1]} measurements do not match {n} optodes x {n_wavelengths} wavelengths")
    index, valid = _offset_index(n)
    per_wl = x.reshape(x.shape[0], n_wavelengths, n * (n - 1))
    grid = per_wl[:, :, index.to(x.device)] * valid.to(x.device, x.dtype)
    return grid.reshape(x.shape[0], n_wavelengths, n, n)


def flatten_measurements(grid: Tensor) -> Tensor:
    """Inverse of ``arrange_measurements``: (B, W, n, n) -> (B, W*n*(n-1))."""
    b, w, n, _ = grid.shape
    index, valid = _offset_index(n)
    flat = grid.reshape(b, w, n * n)[:, :, valid.to(grid.device)]
    order = torch.argsort(index[valid]).to(grid.device)
    return flat[:, :, order].reshape(b, w * n * (n - 1))


class MeasurementNormalizer:
    """Log-ratio to a homogeneous reference, then per-wavelength standardisation.

    ``fit`` takes raw amplitudes (N, W*n*(n-1)); the statistics are stored with the model so
    inference applies exactly the training transform.  ``log_input=False`` means the data are
    already log-amplitudes.
    """

    def __init__(self, n_optodes: int = N_OPTODES, n_wavelengths: int = N_WAVELENGTHS,
                 log_input: bool = True, eps: float = 1e-12) -> None:
        self.n_optodes = n_optodes
        self.n_wavelengths = n_wavelengths
        self.log_input = log_input
        self.eps = eps
        self.mean: Optional[Tensor] = None
        self.std: Optional[Tensor] = None
        self.log_reference: Optional[Tensor] = None

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def _log_ratio(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.shape[-1] != n_measurements(self.n_optodes, self.n_wavelengths):
            raise ValueError(f"expected {n_measurements(self.n_optodes, self.n_wavelengths)} "
                             f"measurements per sample, got {x.shape[-1]}")
        y = torch.log(x.clamp_min(self.eps)) if self.log_input else x
        if self.log_reference is not None:
            y = y - self.log_reference
        return y.reshape(*x.shape[:-1], self.n_wavelengths, -1)

    def fit(self, x: Tensor, reference: Optional[Tensor] = None) -> "MeasurementNormalizer":
        """Learn per-wavelength mean/std from training data (N, n_meas); ``reference`` (n_meas,)."""
        self.log_reference = None
        if reference is not None:
            ref = torch.as_tensor(reference, dtype=torch.float64).reshape(-1)
            self.log_reference = torch.log(ref.clamp_min(self.eps)) if self.log_input else ref
        y = self._log_ratio(x).transpose(0, -2).reshape(self.n_wavelengths, -1)
        self.mean = y.mean(dim=1)
        self.std = y.std(dim=1).clamp_min(1e-8) if y.shape[1] > 1 else torch.ones(self.n_wavelengths,
                                                                                  dtype=torch.float64)
        return self

    def transform(self, x: Tensor) -> Tensor:
        """Raw amplitudes (..., n_meas) -> standardised float32 network input (..., n_meas)."""
        if not self.fitted:
            raise RuntimeError("MeasurementNormalizer.transform called before fit/load_state_dict")
        y = (self._log_ratio(x) - self.mean[:, None]) / self.std[:, None]
        return y.reshape(*y.shape[:-2], -1).float()

    def inverse_transform(self, z: Tensor) -> Tensor:
        """Standardised values back to raw amplitudes (or log-amplitudes if ``log_input=False``)."""
        if not self.fitted:
            raise RuntimeError("MeasurementNormalizer.inverse_transform called before fit")
        z = torch.as_tensor(z, dtype=torch.float64)
        y = z.reshape(*z.shape[:-1], self.n_wavelengths, -1) * self.std[:, None] + self.mean[:, None]
        y = y.reshape(*z.shape)
        if self.log_reference is not None:
            y = y + self.log_reference
        return torch.exp(y) if self.log_input else y

    def state_dict(self) -> Dict[str, Tensor]:
        """Tensors only (checkpoint ``extra_tensors``); an empty ``log_reference`` means none."""
        if not self.fitted:
            raise RuntimeError("cannot save an unfitted MeasurementNormalizer")
        empty = torch.zeros(0, dtype=torch.float64)
        return {"mean": self.mean.clone(), "std": self.std.clone(),
                "log_reference": empty if self.log_reference is None else self.log_reference.clone(),
                "n_optodes": torch.tensor(self.n_optodes), "n_wavelengths": torch.tensor(self.n_wavelengths),
                "log_input": torch.tensor(int(self.log_input)), "eps": torch.tensor(self.eps, dtype=torch.float64)}

    def load_state_dict(self, state: Dict[str, Tensor]) -> "MeasurementNormalizer":
        self.n_optodes = int(state["n_optodes"])
        self.n_wavelengths = int(state["n_wavelengths"])
        self.log_input = bool(int(state["log_input"]))
        self.eps = float(state["eps"])
        self.mean = state["mean"].to(torch.float64).clone()
        self.std = state["std"].to(torch.float64).clone()
        ref = state["log_reference"]
        self.log_reference = ref.to(torch.float64).clone() if ref.numel() else None
        return self

    @classmethod
    def from_state_dict(cls, state: Dict[str, Tensor]) -> "MeasurementNormalizer":
        return cls().load_state_dict(state)


# ----------------------------------------------------------------------------- building blocks

def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, padding_mode: str = "zeros") -> nn.Sequential:
    """sigma(x * k): convolution + BN + ReLU (Fig. 1: every operation carries BN and ReLU)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False,
                                   padding_mode=padding_mode),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def fit_size(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize to ``size`` when needed (odd pyramid sizes, e.g. 24 -> 25 for 100 px)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def pyramid_sizes(size: Sequence[int], levels: int = 4) -> List[Tuple[int, int]]:
    """Spatial sizes of MRI features psi^0..psi^levels under 2x2 max-pooling (100 -> ... -> 6)."""
    sizes = [(int(size[0]), int(size[1]))]
    for _ in range(levels):
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    if min(sizes[-1]) < 1:
        raise ValueError(f"image {tuple(size)} too small for {levels} pooling levels")
    return sizes


class UpBlock(nn.Module):
    """sigma(sigma(x deconv k2x2) * k3x3), landing exactly on ``size``.

    Doubling uses a stride-2 transposed convolution; where the target is the input's own size
    (Z-Net's last concatenation stage at full resolution) the 2x2 transposed convolution has
    stride 1 and is cropped back, which keeps the paper's operator without a 5th doubling.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.up2 = nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False)
        self.post_up = nn.Sequential(nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        self.conv = conv_bn_relu(c_out, c_out)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        h, w = x.shape[-2:]
        if (h, w) == tuple(size):
            y = F.conv_transpose2d(x, self.up2.weight, stride=1)[..., :h, :w]
        else:
            y = fit_size(self.up2(x), size)
        return self.conv(self.post_up(y))


# ----------------------------------------------------------------------------- networks

class NirstInputs:
    """Shared input contract of Z-Net and Y-Net (needs ``n_optodes`` and ``n_wavelengths``)."""

    n_optodes: int
    n_wavelengths: int

    @property
    def n_inputs(self) -> int:
        return n_measurements(self.n_optodes, self.n_wavelengths)

    def prepare_inputs(self, measurements: Tensor, mri: Tensor) -> Tuple[Tensor, Tensor]:
        """Accept flat (B, n_meas) or arranged (B, W, n, n) signals and (B, H, W)/(B, C, H, W) MRI."""
        if measurements.dim() == 2:
            measurements = arrange_measurements(measurements, None, self.n_wavelengths)
        if measurements.dim() != 4 or measurements.shape[1] != self.n_wavelengths:
            raise ValueError(f"measurements must be (B, {self.n_inputs}) or (B, {self.n_wavelengths}, n, n), "
                             f"got {tuple(measurements.shape)}")
        if mri.dim() == 3:
            mri = mri.unsqueeze(1)
        if mri.dim() != 4 or mri.shape[0] != measurements.shape[0]:
            raise ValueError(f"MRI must be (B, H, W) or (B, C, H, W) with B={measurements.shape[0]}, "
                             f"got {tuple(mri.shape)}")
        return measurements, mri


class ZNet(NirstInputs, nn.Module):
    """Z-Net: signal branch (up-sampling), MRI branch (down-sampling), joint decoder.

    Widths (the figure's numbers are not in the text; chosen as the usual halving/doubling
    pyramid around the stated 6x6x256 signal feature, giving 3,523,571 parameters against the
    paper's 3.48M, +1.3 %): signal branch 9 -> 128 -> 256, then 256/128/64/32/16 for phi^0..phi^4;
    MRI branch 1x1 convs to 32, 32, then 32/64/128/256 for psi^1..psi^4 (psi^4 is 6x6x256
    like phi^0); decoder 256/128/64/32/16, final 3x3 convs 16 -> 16 -> 3.
    """

    def __init__(self, n_optodes: int = N_OPTODES, n_wavelengths: int = N_WAVELENGTHS, out_channels: int = 3,
                 signal_widths: Sequence[int] = (256, 128, 64, 32, 16), signal_stem: int = 128,
                 mri_widths: Sequence[int] = (32, 32, 64, 128, 256), mri_channels: int = 1,
                 decoder_widths: Sequence[int] = (256, 128, 64, 32, 16)) -> None:
        super().__init__()
        if not (len(signal_widths) == len(mri_widths) == len(decoder_widths) == 5):
            raise ValueError("Z-Net has five levels (phi^0..4, psi^0..4, decoder 0..4)")
        self.n_optodes = n_optodes
        self.n_wavelengths = n_wavelengths
        sw, mw, dw = list(signal_widths), list(mri_widths), list(decoder_widths)
        # Step 1, Eq. (1)-(2): signal -> 6x6x256 -> four up-sampling layers.
        self.signal_stem = nn.Sequential(conv_bn_relu(n_wavelengths, signal_stem, padding_mode="circular"),
                                         conv_bn_relu(signal_stem, sw[0], padding_mode="circular"))
        self.signal_pool = nn.AvgPool2d(2, ceil_mode=True)
        self.signal_up = nn.ModuleList([UpBlock(sw[i], sw[i + 1]) for i in range(4)])
        # Step 2, Eq. (3)-(4): MRI -> two 1x1 convs -> four (conv3x3, conv3x3, max-pool) layers.
        self.mri_stem = nn.Sequential(conv_bn_relu(mri_channels, mw[0], 1), conv_bn_relu(mw[0], mw[0], 1))
        self.mri_down = nn.ModuleList([nn.Sequential(conv_bn_relu(mw[i], mw[i + 1]),
                                                     conv_bn_relu(mw[i + 1], mw[i + 1])) for i in range(4)])
        # Step 3, Eq. (5)-(6): concatenation layers; layer n sees [decoder_{n-1}, phi^n, psi^{4-n}].
        dec_in = [sw[0] + mw[4]] + [dw[n - 1] + sw[n] + mw[4 - n] for n in range(1, 5)]
        self.decoder = nn.ModuleList([UpBlock(dec_in[n], dw[n]) for n in range(5)])
        # Eq. (7): two 3x3 convs to the chromophore maps; the last one is linear (see ``forward``).
        self.head = nn.Sequential(conv_bn_relu(dw[4], dw[4]), nn.Conv2d(dw[4], out_channels, 3, padding=1))

    def forward(self, measurements: Tensor, mri: Tensor) -> Tensor:
        """Return (B, out_channels, H, W) at the MRI's resolution.

        The optode count is read from the input, so the same weights run on 8-optode data
        (the paper's generalisation test).  The output layer has no BN/ReLU although Eq. (7)
        writes sigma: targets are standardised and a final ReLU would clip them.
        """
        s, m = self.prepare_inputs(measurements, mri)
        sizes = pyramid_sizes(m.shape[-2:])               # psi^0..psi^4, e.g. 100, 50, 25, 12, 6
        psi = [self.mri_stem(m)]
        for down in self.mri_down:
            psi.append(F.max_pool2d(down(psi[-1]), 2))
        phi = [fit_size(self.signal_pool(self.signal_stem(s)), sizes[4])]   # L(p(...)): 6x6x256
        for n, up in enumerate(self.signal_up, start=1):
            phi.append(up(phi[-1], sizes[4 - n]))
        out = self.decoder[0](torch.cat([phi[0], psi[4]], dim=1), sizes[3])
        for n in range(1, 5):
            out = self.decoder[n](torch.cat([out, phi[n], psi[4 - n]], dim=1), sizes[max(3 - n, 0)])
        return self.head(out)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count (the paper's Table 1 measure)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
