"""The LevelSet R-CNN loss on the initial and final level sets.

For phi in {phi_0, phi_N}: ``L1(phi, TSDF_gt) + BCE(H_eps(phi), M_gt)`` with the soft Heaviside
at eps = 0.1 (paper, section 4.2); total = ``weight_initial`` x term(phi_0) + ``weight_final``
x term(phi_N).  The paper used weights 1 / 5 (Cityscapes) and 0.2 / 1 (COCO); our default 1 / 1.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ..chanvese import heaviside

BCE_EPS = 0.1


def tsdf_term(phi: torch.Tensor, tsdf: torch.Tensor, mask: torch.Tensor, eps: float = BCE_EPS) -> torch.Tensor:
    """Mean L1 to the target TSDF plus BCE of H_eps(phi) to the target mask."""
    prob = heaviside(phi, eps).clamp(1e-6, 1.0 - 1e-6)
    return (phi - tsdf).abs().mean() + F.binary_cross_entropy(prob, mask.to(phi.dtype))


def refine_loss(out: Dict[str, torch.Tensor], tsdf: torch.Tensor, mask: torch.Tensor, *,
                weight_initial: float = 1.0, weight_final: float = 1.0, eps: float = BCE_EPS) -> Dict[str, torch.Tensor]:
    """``{"loss", "initial", "final"}`` for a model output ``out`` (keys ``phi0``, ``phiN``)."""
    initial = tsdf_term(out["phi0"], tsdf, mask, eps)
    final = tsdf_term(out["phiN"], tsdf, mask, eps)
    return {"loss": weight_initial * initial + weight_final * final, "initial": initial, "final": final}
