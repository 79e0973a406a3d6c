"""Per-voxel attack losses and the foreground Dice that defines success for segmentation.

Every loss takes logits ``(B, K, *spatial)`` and an integer label map ``(B, *spatial)`` and
returns one value per case ``(B,)``: the per-voxel loss averaged over all voxels of the case
(as in the ROG extension of AutoAttack).  The attacks *maximise* these losses.

A classifier is the special case of one voxel (``spatial == (1, 1)``), where every loss reduces
to its classification definition in Croce & Hein (2020).

Foreground Dice (the segmentation "accuracy"): for each case, the mean over the foreground
classes ``1..K-1`` that occur in the reference *or* in the prediction of
``2 |P_c & Y_c| / (|P_c| + |Y_c|)``; a case with no foreground in either has Dice 1.  With one
voxel this is the accuracy: 1 when the prediction is right, 0 when it is wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-12


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-case confusion counts ``(B, K, K)``: ``[b, true, predicted]``."""
    b = pred.shape[0]
    flat = target.reshape(b, -1).long() * num_classes + pred.reshape(b, -1).long()
    offsets = torch.arange(b, device=flat.device).unsqueeze(1) * (num_classes * num_classes)
    counts = torch.bincount((flat + offsets).reshape(-1), minlength=b * num_classes * num_classes)
    return counts.reshape(b, num_classes, num_classes)


def foreground_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean foreground Dice per case ``(B,)`` of label maps ``pred`` and ``target`` ``(B, *spatial)``.

    Averages over the classes ``1..K-1`` present in the reference or the prediction; a case
    where neither has any foreground scores 1.  ``num_classes`` is K (including background).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(target.shape)} differ in shape")
    if num_classes < 2:
        raise ValueError("foreground Dice needs at least 2 classes (background + one foreground)")
    cm = confusion(pred, target, num_classes).double()
    inter = torch.diagonal(cm, dim1=1, dim2=2)[:, 1:]
    size_true = cm.sum(dim=2)[:, 1:]
    size_pred = cm.sum(dim=1)[:, 1:]
    total = size_true + size_pred
    present = total > 0
    per_class = torch.where(present, 2.0 * inter / total.clamp_min(1.0), torch.zeros_like(total))
    n_present = present.sum(dim=1)
    dice = per_class.sum(dim=1) / n_present.clamp_min(1)
    return torch.where(n_present > 0, dice, torch.ones_like(dice)).float()


def logits_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Foreground Dice ``(B,)`` of the arg-max prediction of ``logits`` ``(B, K, ...)``."""
    return foreground_dice(logits.argmax(dim=1), target, logits.shape[1])


def _mean_per_case(per_voxel: torch.Tensor) -> torch.Tensor:
    return per_voxel.reshape(per_voxel.shape[0], -1).mean(dim=1)


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per voxel, averaged over each case's voxels ``(B,)`` (to be maximised)."""
    return _mean_per_case(F.cross_entropy(logits, target.long(), reduction="none"))


def _check_dlr_classes(num_classes: int, needed: int, name: str) -> None:
    if num_classes < needed:
        alternative = ("use APGD-CE or the targeted cross-entropy (loss='ce-t', reported as APGD-T-CE) "
                       "for 2-class models" if needed == 3 else
                       "use loss='dlr' (3 classes) or loss='ce-t' instead")
        raise ValueError(
            f"the {name} loss needs at least {needed} classes but the model returns {num_classes}: its "
            f"denominator uses the {'third' if needed == 3 else 'fourth'}-largest logit; {alternative}")


def require_dlr_classes(num_classes: int, targeted: bool = False) -> None:
    """Raise ``ValueError`` unless a (targeted) DLR loss is defined for ``num_classes`` classes."""
    if targeted:
        _check_dlr_classes(num_classes, 4, "targeted DLR")
    else:
        _check_dlr_classes(num_classes, 3, "DLR")


def _sorted_last(logits: torch.Tensor) -> torch.Tensor:
    """Logits with the class axis last ``(B, *spatial, K)``."""
    return logits.movedim(1, -1)


def dlr_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits-ratio loss per voxel, averaged over each case ``(B,)``.

    Per voxel: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)`` with ``z_pi1 >= z_pi2 >= z_pi3`` the
    sorted logits (Croce & Hein 2020) -- invariant to shifting and rescaling the logits.
    Needs at least 3 classes: a 2-class model raises ``ValueError`` (use CE or targeted CE).
    """
    _check_dlr_classes(logits.shape[1], 3, "DLR")
    z = _sorted_last(logits)
    z_sorted, _ = z.sort(dim=-1, descending=True)
    z_y = z.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    y_is_top = z.argmax(dim=-1) == target
    best_other = torch.where(y_is_top, z_sorted[..., 1], z_sorted[..., 0])
    per_voxel = -(z_y - best_other) / (z_sorted[..., 0] - z_sorted[..., 2] + _TINY)
    return _mean_per_case(per_voxel)


def targeted_dlr_loss(logits: torch.Tensor, target: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Targeted DLR per voxel ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, mean per case ``(B,)``.

    ``goal`` is the per-voxel target class map; needs at least 4 classes.
    """
    _check_dlr_classes(logits.shape[1], 4, "targeted DLR")
    z = _sorted_last(logits)
    z_sorted, _ = z.sort(dim=-1, descending=True)
    z_y = z.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    z_t = z.gather(-1, goal.long().unsqueeze(-1)).squeeze(-1)
    denom = z_sorted[..., 0] - 0.5 * (z_sorted[..., 2] + z_sorted[..., 3]) + _TINY
    return _mean_per_case(-(z_y - z_t) / denom)


def targeted_ce_loss(logits: torch.Tensor, target: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Minus the cross-entropy towards the per-voxel target class ``goal``, mean per case ``(B,)``."""
    del target  # the true label does not enter the targeted cross-entropy
    return -_mean_per_case(F.cross_entropy(logits, goal.long(), reduction="none"))


def margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-voxel margin ``z_y - max_{i != y} z_i`` ``(B, *spatial)``; negative where misclassified."""
    z = _sorted_last(logits)
    z_y = z.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    others = z.scatter(-1, target.long().unsqueeze(-1), float("-inf"))
    return z_y - others.max(dim=-1).values


def target_classes(logits: torch.Tensor, target: torch.Tensor, rank: int = 1) -> torch.Tensor:
    """Per-voxel target class: the ``rank``-th most likely class other than the true one ``(B, *spatial)``.

    ``rank=1`` is the best wrong class (the second-best class where the prediction is right).
    """
    num_classes = logits.shape[1]
    if not 1 <= rank <= num_classes - 1:
        raise ValueError(f"target rank {rank} is out of range for {num_classes} classes (1..{num_classes - 1})")
    z = _sorted_last(logits).detach()
    others = z.scatter(-1, target.long().unsqueeze(-1), float("-inf"))
    order = others.argsort(dim=-1, descending=True)
    return order[..., rank - 1]


def foreground_mask(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Voxels that can change the foreground Dice: reference or prediction is foreground.

    A case with no foreground at all gets every voxel (so the mask is never empty).
    """
    mask = (pred > 0) | (target > 0)
    empty = ~mask.reshape(mask.shape[0], -1).any(dim=1)
    if empty.any():
        mask[empty] = True
    return mask
