"""GLS: global + local keypoint-guided segmentation of 2D B-scans (thesis Table 1).

Table 1 of the thesis, as read (rows 1-10; "——" = nothing in that row):

====  =========  ===========  ===========  =========  ===========  =======
row   SE         GSD          KPLD         L-Encoder  L-Decoder    Fusion
====  =========  ===========  ===========  =========  ===========  =======
1     conv3-16   up-conv-128  up-conv-128  conv3-16   up-conv-128  conv3-16
2     maxpool    ——           ——           maxpool    ——           ——
3     conv3-32   up-conv-64   up-conv-64   conv3-32   up-conv-64   conv3-16
4     maxpool    ——           ——           maxpool    ——           ——
5     conv3-64   up-conv-32   up-conv-32   conv3-64   up-conv-32   conv1-1
6     maxpool    ——           ——           maxpool    ——           ——
7     conv3-128  up-conv-16   up-conv-16   conv3-128  up-conv-16   ——
8     maxpool    ——           ——           maxpool    ——           ——
9     conv3-256  conv1-1      conv1-K      conv3-256  conv1-1      ——
10    ——         sigmoid      sigmoid      ——         sigmoid      sigmoid
====  =========  ===========  ===========  =========  ===========  =======

SE = shared encoder, GSD = global segmentation decoder, KPLD = keypoint decoder, L = local
U-Net; encoder and decoders are joined by "the same skip connections as U-Net".

Where the thesis is silent, and what is built here:

* **Convs per level.** The table lists one ``conv3-c`` per encoder level and only an
  ``up-conv-c`` per decoder level, while the text calls the local net "a U-Net".  Default:
  the U-Net reading, ``encoder_convs=2`` (two 3x3 convs per encoder level) and
  ``decoder_convs=2`` (two 3x3 convs after each skip concatenation).  The literal table is
  ``encoder_convs=1, decoder_convs=0`` (the next up-conv then reads the concatenation).
* **Norm / activation.** Not stated: every 3x3 conv (encoder, decoder, up-conv, fusion) is
  followed by batch norm and ReLU (``norm="batch"``; ``"instance"`` or ``"none"`` also work);
  the 1x1 output convs have neither and end in the sigmoid of row 10.
* **up-conv-c** = 2x bilinear upsampling + 3x3 conv to ``c`` channels + norm + ReLU (the
  "up_conv" of common PyTorch U-Nets); padding keeps sizes, so H and W must be divisible by
  16 (2 ** number of max-pools) for the global net.
* **Crop size.** The thesis crops 100x100.  The default here is 96x96: the local U-Net pools
  four times, and 96 is the nearest multiple of 16, so no padding is needed.  Any size works:
  the local net pads a crop (replicate) to the next multiple of 16 and cuts its output back,
  so ``crop_size=100`` reproduces the paper at the cost of a 112x112 pass.
* **Crops** come from the image only (in_channels), centred at each heatmap's argmax and
  shifted inside the image at borders; the local masks are pasted back onto a zero canvas,
  overlaps combined by max (:mod:`deepimaging.gls.crops`).
* **Fusion** reads ``[global probability, pasted local probability]``.

Parameters at the defaults (1 input channel, K = 2, 2+2 convs, batch norm): shared encoder
1,179,472; global decoder 980,657; keypoint decoder 980,674 (global_net 3,140,803); local
U-Net 2,160,129; fusion 2,673; total 5,303,605 (:meth:`GLSNet.parameter_counts`).  The
literal table (``encoder_convs=1, decoder_convs=0``) has 2,255,221.

Output convention: every ``forward`` returns **probabilities in [0, 1]** (sigmoid applied),
as the thesis' networks and the baselines in :mod:`deepimaging.gls.baselines` do; the logits
come along in :meth:`GLSNet.forward`'s dict for losses that need them (AMP-safe BCE).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepimaging.core.errors import InputError

from .crops import Size, as_hw, crop_origins, extract_crops, heatmap_argmax, paste_crops, PASTE_REDUCTIONS

DEFAULT_WIDTHS = (16, 32, 64, 128, 256)
DEFAULT_CROP = (96, 96)
NORMS = ("batch", "instance", "none")
FUSION_WIDTH = 16
STAGE_FROZEN = {1: ("fusion", "local_net"), 2: ("fusion", "global_net"), 3: ()}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def conv3(in_channels: int, out_channels: int, norm: str = "batch") -> nn.Sequential:
    """3x3 conv (padding 1) + norm + ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none"),
                         _norm(norm, out_channels), nn.ReLU(inplace=True))


def conv_block(in_channels: int, out_channels: int, convs: int, norm: str) -> nn.Sequential:
    """``convs`` x conv3 (``convs=0``: identity)."""
    layers = [conv3(in_channels if i == 0 else out_channels, out_channels, norm) for i in range(convs)]
    return nn.Sequential(*layers)


def _check_widths(widths: Sequence[int]) -> Tuple[int, ...]:
    out = tuple(int(w) for w in widths)
    if len(out) < 2 or any(w < 1 for w in out):
        raise ValueError(f"widths must be at least two positive channel counts, got {tuple(widths)}")
    return out


def check_image_batch(x: torch.Tensor, in_channels: int, divisor: int, what: str = "input") -> None:
    """Raise :class:`InputError` unless ``x`` is ``(B, in_channels, H, W)`` with H, W % divisor == 0."""
    if x.dim() != 4:
        raise InputError(f"{what} must be a (B, C, H, W) batch of 2D images, got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise InputError(f"{what} has {x.shape[1]} channel(s); the network expects {in_channels}")
    h, w = x.shape[-2:]
    if h % divisor or w % divisor:
        raise InputError(f"{what} size {h}x{w} is not divisible by {divisor}; pad or resize the image "
                         f"to a multiple of {divisor} (e.g. {-(-h // divisor) * divisor}x{-(-w // divisor) * divisor})")


class Encoder(nn.Module):
    """Conv blocks at ``widths`` with a 2x2 max-pool before every block but the first."""

    def __init__(self, in_channels: int, widths: Sequence[int], convs: int = 2, norm: str = "batch"):
        super().__init__()
        if convs < 1:
            raise ValueError("the encoder needs at least one conv per level")
        chans = [in_channels] + list(widths)
        self.blocks = nn.ModuleList(conv_block(chans[i], chans[i + 1], convs, norm) for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Features of every level, finest first."""
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats


class UpConv(nn.Sequential):
    """Table 1's up-conv-c: 2x bilinear upsampling, 3x3 conv to ``c``, norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch"):
        super().__init__(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         conv3(in_channels, out_channels, norm))


class Decoder(nn.Module):
    """U-Net decoder: up-conv, concat skip, conv block per level, then a 1x1 conv (logits)."""

    def __init__(self, widths: Sequence[int], out_channels: int, convs: int = 2, norm: str = "batch"):
        super().__init__()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        channels = widths[-1]
        for width in reversed(widths[:-1]):
            self.ups.append(UpConv(channels, width, norm))
            self.blocks.append(conv_block(2 * width, width, convs, norm))
            channels = width if convs else 2 * width
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(feats[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class UNet2d(nn.Module):
    """Plain U-Net (encoder + decoder) returning logits; pads inputs to a multiple of 2**depth.

    Used as GLS's local network, whose crops need not be a multiple of 16 (thesis: 100x100).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS,
                 encoder_convs: int = 2, decoder_convs: int = 2, norm: str = "batch"):
        super().__init__()
        widths = _check_widths(widths)
        self.divisor = 2 ** (len(widths) - 1)
        self.encoder = Encoder(in_channels, widths, encoder_convs, norm)
        self.decoder = Decoder(widths, out_channels, decoder_convs, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % self.divisor, -w % self.divisor
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
        out = self.decoder(self.encoder(x))
        return out[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


class GlobalNet(nn.Module):
    """Shared encoder + global segmentation decoder + keypoint decoder; returns logits."""

    def __init__(self, in_channels: int = 1, keypoints: int = 2, widths: Sequence[int] = DEFAULT_WIDTHS,
                 encoder_convs: int = 2, decoder_convs: int = 2, norm: str = "batch"):
        super().__init__()
        widths = _check_widths(widths)
        self.in_channels = in_channels
        self.divisor = 2 ** (len(widths) - 1)
        self.encoder = Encoder(in_channels, widths, encoder_convs, norm)
        self.seg_decoder = Decoder(widths, 1, decoder_convs, norm)
        self.keypoint_decoder = Decoder(widths, keypoints, decoder_convs, norm)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, C, H, W) -> (mask logits (B, 1, H, W), heatmap logits (B, K, H, W))."""
        check_image_batch(x, self.in_channels, self.divisor)
        feats = self.encoder(x)
        return self.seg_decoder(feats), self.keypoint_decoder(feats)


class GlobalOnly(nn.Module):
    """The "global-only branch" baseline (thesis Table 3, GS): a :class:`GlobalNet` alone.

    ``forward`` returns the mask probability (B, 1, H, W) (logits with ``logits=True``); the
    keypoint decoder is still trained (multi-task) through :meth:`forward_global`.
    """

    def __init__(self, global_net: Optional[GlobalNet] = None, logits: bool = False, **kwargs: Any):
        super().__init__()
        self.global_net = global_net if global_net is not None else GlobalNet(**kwargs)
        self.logits = logits
        self.size_divisor = self.global_net.divisor

    def forward_global(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mask probability, heatmaps), as :meth:`GLSNet.forward_global`."""
        mask, heat = self.global_net(x)
        return torch.sigmoid(mask), torch.sigmoid(heat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.global_net(x)[0]
        return mask if self.logits else torch.sigmoid(mask)


class Fusion(nn.Sequential):
    """conv3-16, conv3-16, conv1-1 on [global, pasted local] (2 channels); returns logits."""

    def __init__(self, width: int = 16, norm: str = "batch"):
        super().__init__(conv3(2, width, norm), conv3(width, width, norm), nn.Conv2d(width, 1, 1))


class GLSNet(nn.Module):
    """Global + keypoint network, local U-Net on keypoint-centred crops, fusion network.

    Training stages (thesis 2.3): ``set_stage(1)`` trains ``global_net`` (mask BCE + heatmap
    loss); ``set_stage(2)`` freezes it (and the unused fusion) and trains ``local_net`` on
    crops at the predicted keypoints; ``set_stage(3)`` unfreezes everything (as
    :meth:`unfreeze_all`) and fine-tunes through ``fusion`` against the mask.
    :meth:`freeze_global` freezes ``global_net`` alone.  A frozen part
    has ``requires_grad=False`` and stays in eval mode (batch-norm statistics frozen) even
    when ``train()`` is called on the whole model.
    """

    def __init__(self, in_channels: int = 1, keypoints: int = 2, crop_size: Size = DEFAULT_CROP,
                 widths: Sequence[int] = DEFAULT_WIDTHS, encoder_convs: int = 2, decoder_convs: int = 2,
                 norm: str = "batch", paste_reduce: str = "max"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if paste_reduce not in PASTE_REDUCTIONS:
            raise ValueError(f"paste_reduce must be one of {PASTE_REDUCTIONS}, got {paste_reduce!r}")
        if int(keypoints) < 1:
            raise ValueError(f"keypoints must be >= 1, got {keypoints}")
        if int(encoder_convs) < 1 or int(decoder_convs) < 0:
            raise ValueError(f"need encoder_convs >= 1 and decoder_convs >= 0, got {encoder_convs}, {decoder_convs}")
        self.in_channels = int(in_channels)
        self.keypoints = int(keypoints)
        self.crop_size = as_hw(crop_size)
        self.widths = _check_widths(widths)
        self.encoder_convs, self.decoder_convs = int(encoder_convs), int(decoder_convs)
        self.norm, self.paste_reduce = norm, paste_reduce
        parts = dict(widths=self.widths, encoder_convs=self.encoder_convs,
                     decoder_convs=self.decoder_convs, norm=norm)
        self.global_net = GlobalNet(self.in_channels, self.keypoints, **parts)
        self.local_net = UNet2d(self.in_channels, 1, **parts)
        self.fusion = Fusion(FUSION_WIDTH, norm)
        self.divisor = self.global_net.divisor
        self._frozen: Tuple[str, ...] = ()

    # -- forward ------------------------------------------------------------------------------
    def forward_global(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x`` -> (mask probability (B, 1, H, W), heatmaps (B, K, H, W)), both in [0, 1]."""
        mask, heat = self.global_net(x)
        return torch.sigmoid(mask), torch.sigmoid(heat)

    def forward_local(self, x: torch.Tensor, keypoints: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Local logits on crops of ``x`` centred at ``keypoints`` (B, K, 2) xy.

        Returns (crop logits (B, K, 1, h, w), crop origins (B, K, 2) xy long); crop the label
        with ``extract_crops(label, origins, model.crop_size)`` for the stage-2 loss.
        """
        check_image_batch(x, self.in_channels, 1)
        origins = crop_origins(keypoints, x.shape[-2:], self.crop_size)
        crops = extract_crops(x, origins, self.crop_size)
        b, k = crops.shape[:2]
        logits = self.local_net(crops.flatten(0, 1))
        return logits.view(b, k, *logits.shape[1:]), origins

    def forward(self, x: torch.Tensor, keypoints: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Full GLS pass; crops at the heatmap argmaxes unless ``keypoints`` (B, K, 2) xy are given.

        Returns probabilities ``global`` (B,1,H,W), ``heatmaps`` (B,K,H,W), ``local`` (pasted,
        B,1,H,W), ``fused`` (B,1,H,W), ``local_crops`` (B,K,1,h,w); ``keypoints`` (B,K,2) float
        xy used for the crops, ``origins`` (B,K,2) long crop corners; and the logits
        ``global_logits``, ``heatmap_logits``, ``local_crop_logits``, ``fused_logits``.
        """
        mask_logits, heat_logits = self.global_net(x)
        mask, heat = torch.sigmoid(mask_logits), torch.sigmoid(heat_logits)
        if keypoints is None:
            keypoints = heatmap_argmax(heat)
        elif tuple(keypoints.shape) != (x.shape[0], self.keypoints, 2):
            raise InputError(f"keypoints must be ({x.shape[0]}, {self.keypoints}, 2) xy, got {tuple(keypoints.shape)}")
        crop_logits, origins = self.forward_local(x, keypoints)
        crops = torch.sigmoid(crop_logits)
        pasted = paste_crops(crops, origins, x.shape[-2:], self.paste_reduce)
        fused_logits = self.fusion(torch.cat([mask, pasted], dim=1))
        return {
            "global": mask, "heatmaps": heat, "keypoints": keypoints.detach().to(mask.dtype),
            "local": pasted, "fused": torch.sigmoid(fused_logits), "local_crops": crops, "origins": origins,
            "global_logits": mask_logits, "heatmap_logits": heat_logits,
            "local_crop_logits": crop_logits, "fused_logits": fused_logits,
        }

    # -- staged training ----------------------------------------------------------------------
    def _set_frozen(self, names: Sequence[str]) -> None:
        self._frozen = tuple(sorted(names))
        for name in ("global_net", "local_net", "fusion"):
            for p in getattr(self, name).parameters():
                p.requires_grad_(name not in self._frozen)
        self.train(self.training)

    def freeze_global(self) -> None:
        """Freeze ``global_net`` only (requires_grad False, eval-mode batch norm); others train."""
        self._set_frozen(("global_net",))

    def unfreeze_all(self) -> None:
        """Make every part trainable again (stage 3)."""
        self._set_frozen(())

    def set_stage(self, stage: int) -> None:
        """1: only global_net trains; 2: only local_net; 3: everything (fusion fine-tuning)."""
        if stage not in STAGE_FROZEN:
            raise ValueError(f"stage must be one of {tuple(STAGE_FROZEN)}, got {stage!r}")
        self._set_frozen(STAGE_FROZEN[stage])

    @property
    def stage(self) -> Optional[int]:
        """The training stage the frozen parts correspond to (None after a bare freeze_global())."""
        for stage, names in STAGE_FROZEN.items():
            if names == self._frozen:
                return stage
        return None

    @property
    def frozen(self) -> Tuple[str, ...]:
        """Names of the parts that are frozen now."""
        return self._frozen

    def train(self, mode: bool = True) -> "GLSNet":
        super().train(mode)
        for name in self._frozen:
            getattr(self, name).eval()
        return self

    def global_only(self) -> GlobalOnly:
        """The global-only baseline sharing this model's ``global_net`` (same weights)."""
        return GlobalOnly(self.global_net)

    # -- bookkeeping --------------------------------------------------------------------------
    def parameter_counts(self) -> Dict[str, int]:
        """Parameters per part: encoder, both decoders, global_net, local_net, fusion, total."""
        g = self.global_net
        return {"encoder": count_parameters(g.encoder), "global_decoder": count_parameters(g.seg_decoder),
                "keypoint_decoder": count_parameters(g.keypoint_decoder), "global_net": count_parameters(g),
                "local_net": count_parameters(self.local_net), "fusion": count_parameters(self.fusion),
                "total": count_parameters(self)}

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments, stored in checkpoint headers."""
        return {"in_channels": self.in_channels, "keypoints": self.keypoints, "crop_size": list(self.crop_size),
                "widths": list(self.widths), "encoder_convs": self.encoder_convs,
                "decoder_convs": self.decoder_convs, "norm": self.norm, "paste_reduce": self.paste_reduce}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "GLSNet":
        """Rebuild from :meth:`config`; unknown keys are an error, not silently dropped."""
        known = {"in_channels", "keypoints", "crop_size", "widths", "encoder_convs", "decoder_convs", "norm",
                 "paste_reduce"}
        extra = set(config) - known
        if extra:
            raise ValueError(f"unknown GLSNet config key(s): {sorted(extra)}")
        return cls(**dict(config))
