"""UGS: uncertainty-aware gradient stabilisation, detector-agnostic (tensors in, tensors out).

Imports only torch. The method and our choices are described in docs/ugs.md. Public functions:
    make_grid, two_hot, expectation, ce_loss, pairwise_ce_loss (a matching cost), um_loss,
    ur_perturbation (and ur_delta, the perturbation alone), uncertainty, box_std_pixels.
"""
from ugs.decode import expectation
from ugs.grid import GRID_KINDS, make_grid
from ugs.losses import ce_loss, pairwise_ce_loss, um_loss
from ugs.refinement import ur_delta, ur_perturbation
from ugs.targets import two_hot
from ugs.uncertainty import box_std_pixels, uncertainty

__all__ = ["GRID_KINDS", "make_grid", "two_hot", "expectation", "ce_loss", "pairwise_ce_loss", "um_loss",
           "ur_perturbation", "ur_delta", "uncertainty", "box_std_pixels"]
