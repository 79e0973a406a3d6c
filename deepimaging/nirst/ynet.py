"""Y-Net baseline for MRI-guided NIRST (the paper's comparison network, after Lan et al. 2020).

Two encoders and one decoder: the measurement encoder and the MRI encoder meet only at the
bottleneck, and the decoder's skip connections come from the MRI encoder alone.  That is the
difference Z-Net removes (there the signal features enter every decoder level).

The paper's Fig. S1 (Y-Net layout) is not in the text we have; the widths below are the plain
U-Net pyramid 32/64/128/256 for both encoders, one 3x3 fusion convolution at the bottleneck and
a mirrored decoder, which gives 6,314,979 parameters against the reported 6.09M (+3.7 %).
Inputs and outputs follow ``ZNet`` exactly (same measurement layout and normalisation).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .znet import N_OPTODES, N_WAVELENGTHS, NirstInputs, conv_bn_relu, fit_size, pyramid_sizes


def double_conv(c_in: int, c_out: int, padding_mode: str = "zeros") -> nn.Sequential:
    """Two 3x3 conv + BN + ReLU, the unit of both encoders and the decoder."""
    return nn.Sequential(conv_bn_relu(c_in, c_out, padding_mode=padding_mode),
                         conv_bn_relu(c_out, c_out, padding_mode=padding_mode))


class YNet(NirstInputs, nn.Module):
    """Measurement encoder + MRI encoder -> bottleneck fusion -> U-Net decoder with MRI skips.

    The measurement encoder works on the (W, n, n) source x offset image of
    ``arrange_measurements`` (circular padding, as in Z-Net); it max-pools between its stages
    and its last feature map is resized bilinearly to the MRI bottleneck (6x6 for 100 px), which
    keeps it independent of the optode count (16 or 8).
    """

    def __init__(self, n_optodes: int = N_OPTODES, n_wavelengths: int = N_WAVELENGTHS, out_channels: int = 3,
                 mri_widths: Sequence[int] = (32, 64, 128, 256), signal_widths: Sequence[int] = (32, 64, 128, 256),
                 bottleneck_width: int = 256, mri_channels: int = 1) -> None:
        super().__init__()
        self.n_optodes = n_optodes
        self.n_wavelengths = n_wavelengths
        mw, sw = list(mri_widths), list(signal_widths)
        self.levels = len(mw)
        self.signal_encoder = nn.ModuleList(
            [double_conv(c_in, c_out, "circular") for c_in, c_out in zip([n_wavelengths] + sw[:-1], sw)])
        self.mri_encoder = nn.ModuleList(
            [double_conv(c_in, c_out) for c_in, c_out in zip([mri_channels] + mw[:-1], mw)])
        self.fusion = conv_bn_relu(mw[-1] + sw[-1], bottleneck_width)
        self.up = nn.ModuleList()
        self.up_post = nn.ModuleList()
        self.dec = nn.ModuleList()
        c_in = bottleneck_width
        for c_skip in reversed(mw):
            self.up.append(nn.ConvTranspose2d(c_in, c_skip, 2, stride=2, bias=False))
            self.up_post.append(nn.Sequential(nn.BatchNorm2d(c_skip), nn.ReLU(inplace=True)))
            self.dec.append(double_conv(2 * c_skip, c_skip))
            c_in = c_skip
        self.head = nn.Conv2d(c_in, out_channels, 1)

    def forward(self, measurements: Tensor, mri: Tensor) -> Tensor:
        """Return (B, out_channels, H, W) at the MRI's resolution; linear output as in Z-Net."""
        s, m = self.prepare_inputs(measurements, mri)
        sizes = pyramid_sizes(m.shape[-2:], self.levels)
        skips = []
        for enc in self.mri_encoder:
            m = enc(m)
            skips.append(m)
            m = F.max_pool2d(m, 2)
        for i, enc in enumerate(self.signal_encoder):
            s = enc(s)
            if i < len(self.signal_encoder) - 1:
                s = F.max_pool2d(s, 2, ceil_mode=True)
        x = self.fusion(torch.cat([m, fit_size(s, sizes[-1])], dim=1))
        for up, post, dec, skip in zip(self.up, self.up_post, self.dec, reversed(skips)):
            x = post(fit_size(up(x), skip.shape[-2:]))
            x = dec(torch.cat([x, skip], dim=1))
        return self.head(x)
