"""GLS network (thesis Table 1): shapes, crops at borders, exact paste-back, staged freezing, config."""

from __future__ import annotations

import json

import pytest
import torch

from deepimaging.core.errors import InputError
from deepimaging.gls.crops import (check_crop_fits, crop_coverage, crop_origins, extract_crops, heatmap_argmax,
                                   paste_crops)
from deepimaging.gls.model import GlobalOnly, GLSNet, UNet2d, count_parameters

SMALL = (4, 8, 16, 32, 64)  # same topology as Table 1 at 1/4 width, for speed


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _small(**kwargs) -> GLSNet:
    kwargs.setdefault("widths", SMALL)
    kwargs.setdefault("crop_size", 32)
    return GLSNet(**kwargs)


def test_default_parameter_counts():
    counts = GLSNet().parameter_counts()
    print("GLSNet default parameter counts:", counts)
    assert counts["global_net"] == counts["encoder"] + counts["global_decoder"] + counts["keypoint_decoder"]
    assert counts["total"] == counts["global_net"] + counts["local_net"] + counts["fusion"]
    assert counts["local_net"] == count_parameters(UNet2d())
    # fusion: conv3-16 (2->16), conv3-16, conv1-1 with batch norm
    assert counts["fusion"] == (2 * 16 * 9 + 32) + (16 * 16 * 9 + 32) + (16 + 1)
    assert 4_000_000 < counts["total"] < 7_000_000


@pytest.mark.parametrize("kwargs", [{}, {"encoder_convs": 1, "decoder_convs": 0}, {"norm": "instance"},
                                    {"keypoints": 3, "in_channels": 2, "paste_reduce": "mean"}])
def test_forward_shapes_and_ranges(kwargs):
    net = _small(**kwargs).eval()
    c, k = net.in_channels, net.keypoints
    x = torch.randn(2, c, 64, 80)
    with torch.no_grad():
        mask, heat = net.forward_global(x)
        out = net(x)
    assert mask.shape == (2, 1, 64, 80) and heat.shape == (2, k, 64, 80)
    assert out["keypoints"].shape == (2, k, 2) and out["origins"].shape == (2, k, 2)
    assert out["local_crops"].shape == (2, k, 1, 32, 32)
    for key in ("global", "local", "fused"):
        assert out[key].shape == (2, 1, 64, 80)
    for key in ("global", "heatmaps", "local", "fused", "local_crops"):
        assert 0.0 <= float(out[key].min()) and float(out[key].max()) <= 1.0
    assert torch.allclose(out["global"], mask) and torch.allclose(out["heatmaps"], heat)
    assert torch.equal(out["keypoints"].long(), heatmap_argmax(heat))
    # outside every crop window the pasted local map is the blank canvas
    cover = crop_coverage(out["origins"], (64, 80), 32)
    assert float(out["local"][cover == 0].abs().max()) == 0.0


def test_crop_size_100_like_the_thesis_is_padded_inside_the_local_net():
    net = _small(crop_size=100)
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, 112, 128))
    assert out["local_crops"].shape == (1, 2, 1, 100, 100)
    assert UNet2d(widths=SMALL)(torch.randn(3, 1, 100, 50)).shape == (3, 1, 100, 50)


def test_bad_inputs_are_clear_errors():
    net = _small()
    with pytest.raises(InputError, match="divisible by 16"):
        net(torch.randn(1, 1, 60, 64))
    with pytest.raises(InputError, match="channel"):
        net(torch.randn(1, 3, 64, 64))
    with pytest.raises(InputError, match="larger than the image"):
        _small(crop_size=96)(torch.randn(1, 1, 64, 128))
    with pytest.raises(InputError, match="larger than the image"):
        check_crop_fits((64, 64), (32, 65))
    with pytest.raises(InputError):
        net(torch.randn(1, 1, 64, 64), keypoints=torch.zeros(1, 3, 2))


H, W, CROP = 40, 56, (16, 20)
CENTRES = [(0, 0), (W - 1, 0), (0, H - 1), (W - 1, H - 1), (W // 2, 0), (W // 2, H - 1), (0, H // 2),
           (W - 1, H // 2), (3, 2), (W - 4, H - 3), (W // 2, H // 2)]


@pytest.mark.parametrize("centre", CENTRES)
def test_crops_near_corners_and_edges_stay_inside_and_paste_back_exactly(centre):
    ch, cw = CROP
    origins = crop_origins(torch.tensor([[centre]]), (H, W), CROP)
    x0, y0 = (int(v) for v in origins[0, 0])
    assert 0 <= x0 <= W - cw and 0 <= y0 <= H - ch
    # the window is the one centred at the point, shifted the least to fit
    assert x0 == min(max(centre[0] - cw // 2, 0), W - cw) and y0 == min(max(centre[1] - ch // 2, 0), H - ch)
    assert x0 <= centre[0] < x0 + cw and y0 <= centre[1] < y0 + ch
    image = torch.arange(H * W, dtype=torch.float32).view(1, 1, H, W)
    crop = extract_crops(image, origins, CROP)
    assert crop.shape == (1, 1, 1, ch, cw)
    assert torch.equal(crop[0, 0, 0], image[0, 0, y0:y0 + ch, x0:x0 + cw])
    for reduce in ("max", "mean"):
        pasted = paste_crops(torch.ones(1, 1, 1, ch, cw), origins, (H, W), reduce)
        expected = torch.zeros(1, 1, H, W)
        expected[..., y0:y0 + ch, x0:x0 + cw] = 1.0
        assert torch.equal(pasted, expected)
    # a crop pasted back where it came from reproduces the image inside the window
    back = paste_crops(crop, origins, (H, W))
    assert torch.equal(back[..., y0:y0 + ch, x0:x0 + cw], image[..., y0:y0 + ch, x0:x0 + cw])


def test_overlapping_crops_max_and_mean():
    origins = torch.tensor([[[0, 0], [10, 4]]])
    crops = torch.stack([torch.full((1, 16, 20), 0.2), torch.full((1, 16, 20), 0.6)]).unsqueeze(0)
    both = (slice(4, 16), slice(10, 20))
    assert torch.allclose(paste_crops(crops, origins, (H, W), "max")[0, 0][both], torch.tensor(0.6))
    mean = paste_crops(crops, origins, (H, W), "mean")[0, 0]
    assert torch.allclose(mean[both], torch.tensor(0.4))
    assert torch.allclose(mean[0, 0], torch.tensor(0.2)) and torch.allclose(mean[19, 29], torch.tensor(0.6))
    assert float(mean[30, 50]) == 0.0
    assert int(crop_coverage(origins, (H, W), CROP, count=True).max()) == 2


def test_heatmap_argmax_gives_the_crop_centre():
    heat = torch.zeros(2, 2, 64, 64)
    points = [[(20, 30), (45, 12)], [(32, 32), (40, 50)]]  # (x, y)
    for b, pts in enumerate(points):
        for k, (px, py) in enumerate(pts):
            heat[b, k, py, px] = 1.0
    centres = heatmap_argmax(heat)
    assert centres.tolist() == [[list(p) for p in pts] for pts in points]
    origins = crop_origins(centres, (64, 64), 24)
    patches = extract_crops(heat.sum(1, keepdim=True), origins, 24)
    for b in range(2):
        for k in range(2):
            assert float(patches[b, k, 0, 12, 12]) == 1.0  # the peak sits at the crop's centre pixel
    # GLSNet crops at the argmax of its own heatmaps, or at given keypoints
    net = _small().eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = net(x, keypoints=centres)
    assert torch.equal(out["origins"], crop_origins(centres, (64, 64), 32))


def test_paste_is_differentiable_wrt_the_crops():
    crops = torch.rand(1, 2, 1, 16, 20, requires_grad=True)
    paste_crops(crops, torch.tensor([[[0, 0], [30, 20]]]), (H, W)).sum().backward()
    assert torch.equal(crops.grad, torch.ones_like(crops))


def test_freeze_global_stops_its_gradients_and_unfreeze_restores():
    net = _small().train()
    x = torch.randn(2, 1, 64, 64)
    net.freeze_global()
    assert net.frozen == ("global_net",) and net.stage is None
    assert not any(p.requires_grad for p in net.global_net.parameters())
    assert not net.global_net.training and net.local_net.training  # frozen BN stays in eval mode
    net.train()
    assert not net.global_net.training
    running = net.global_net.encoder.blocks[0][0][1].running_mean.clone()
    net(x)["fused"].mean().backward()
    assert all(p.grad is None for p in net.global_net.parameters())
    assert all(p.grad is not None for p in net.fusion.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.local_net.parameters())
    assert torch.equal(running, net.global_net.encoder.blocks[0][0][1].running_mean)
    net.zero_grad(set_to_none=True)
    net.unfreeze_all()
    assert net.stage == 3 and net.global_net.training
    assert all(p.requires_grad for p in net.parameters())
    net(x)["fused"].mean().backward()
    assert all(p.grad is not None for p in net.global_net.encoder.parameters())


def test_stages():
    net = _small()
    net.set_stage(1)
    assert [n for n in ("global_net", "local_net", "fusion")
            if any(p.requires_grad for p in getattr(net, n).parameters())] == ["global_net"]
    net.set_stage(2)
    assert net.stage == 2 and count_parameters(net, trainable_only=True) == count_parameters(net.local_net)
    net.set_stage(3)
    assert count_parameters(net, trainable_only=True) == count_parameters(net)
    with pytest.raises(ValueError):
        net.set_stage(4)


def test_config_round_trip():
    net = _small(keypoints=3, crop_size=(32, 48), encoder_convs=1, decoder_convs=1, norm="instance",
                 paste_reduce="mean")
    config = json.loads(json.dumps(net.config()))
    rebuilt = GLSNet.from_config(config)
    assert rebuilt.config() == net.config()
    a, b = net.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x)["fused"], rebuilt.eval()(x)["fused"])
    with pytest.raises(ValueError, match="unknown"):
        GLSNet.from_config({**config, "depth": 3})


def test_global_only_shares_the_global_net():
    net = _small().eval()
    gs = net.global_only()
    assert isinstance(gs, GlobalOnly) and gs.global_net is net.global_net
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(gs(x), net.forward_global(x)[0])


def test_global_branch_overfits_a_disc():
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disc = (((yy - 30) ** 2 + (xx - 36) ** 2) < 15 ** 2).float()
    x = (disc + 0.3 * torch.randn(2, 1, 64, 64)).clamp(-1, 2)
    target = disc.expand(2, 1, 64, 64)
    net = GLSNet().train()  # Table 1 widths
    net.set_stage(1)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(100):
        mask, _heat = net.forward_global(x)
        loss = torch.nn.functional.binary_cross_entropy(mask, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"global-branch BCE {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.5 * losses[0]
