"""Adversarial robustness of segmentation models: L-infinity attacks and AutoAttack for 3D/2D segmentation.

Attacks (inputs ``(B, C, *spatial)``, per-voxel logits ``(B, K, *spatial)``, labels ``(B, *spatial)``):
:func:`pgd_attack`, :func:`apgd_attack` (CE, DLR, targeted CE/DLR), :func:`fab_t_attack`,
:func:`square_attack`.  Benchmark: :func:`run_autoattack`; reports: :func:`write_report`.
Epsilon helpers: :func:`range_scaled_eps` (8/255 of each channel's valid range),
:func:`intensity_eps_to_normalised` (HU -> z-units), :func:`normalise_intensity_range`.
See :mod:`deepimaging.robustness.attacks` for how eps maps onto z-scored CT/MRI.
"""

from __future__ import annotations

from deepimaging.robustness.apgd import apgd_attack, apgd_checkpoint_intervals
from deepimaging.robustness.attacks import (AttackResult, ClassifierAsSegmenter, GradientMaskingError, attack_mode,
                                            check_input_gradients, intensity_eps_to_normalised,
                                            normalise_intensity_range, pgd_attack, range_scaled_eps,
                                            valid_range_from_channels)
from deepimaging.robustness.autoattack import (DEFAULT_ATTACKS, KNOWN_ATTACKS, PRESETS, RobustnessResult,
                                               normalised_auc, run_autoattack)
from deepimaging.robustness.fab import fab_t_attack, project_linf_hyperplane
from deepimaging.robustness.losses import (ce_loss, dlr_loss, foreground_dice, logits_dice, targeted_ce_loss,
                                           targeted_dlr_loss)
from deepimaging.robustness.report import markdown_table, plot_dice_vs_eps, result_dict, write_report
from deepimaging.robustness.square import square_attack, square_fraction

__all__ = [
    "AttackResult", "ClassifierAsSegmenter", "DEFAULT_ATTACKS", "GradientMaskingError", "KNOWN_ATTACKS", "PRESETS",
    "RobustnessResult", "apgd_attack", "apgd_checkpoint_intervals", "attack_mode", "ce_loss", "check_input_gradients",
    "dlr_loss", "fab_t_attack", "foreground_dice", "intensity_eps_to_normalised", "logits_dice", "markdown_table",
    "normalise_intensity_range", "normalised_auc", "pgd_attack", "plot_dice_vs_eps", "project_linf_hyperplane",
    "range_scaled_eps", "result_dict", "run_autoattack", "square_attack", "square_fraction", "targeted_ce_loss",
    "targeted_dlr_loss", "valid_range_from_channels", "write_report",
]
