"""UGS section of the config (the method and our choices: docs/ugs.md).

The defaults hold the paper's best values (lambda_1 = lambda_2 = rho = 0.5, alpha = 1) with the
method switched off (`enabled = False`), so a DINO config is the L1 baseline and a `*_ugs` config
sets `enabled = True`. Each row of the paper's ablation (Table 6) is one override of `ablation`:

    ugs.ablation=l1          L1 baseline        enabled=False
    ugs.ablation=ce_uniform  CE, uniform grid   enabled, box_loss=ce, grid.kind=uniform, um=0, ur=0
    ugs.ablation=ce_in       CE + IN grid       enabled, box_loss=ce, grid.kind=in,      um=0, ur=0
    ugs.ablation=ce_in_um    + UM               enabled, box_loss=ce, grid.kind=in,      ur=0
    ugs.ablation=full        + UR               enabled, box_loss=ce, grid.kind=in

Setting `ablation` (in the constructor, as an attribute or as an override) writes those switches
into the fields below, which stay the single source of truth that builders read (the dumped config
shows the applied values). Weights that a row keeps on keep their configured value (the paper's
0.5 by default). `check()` rejects a later override that contradicts the chosen row;
`ablation=custom` (the default) imposes nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from configs.overrides import ConfigError

ABLATION_ROWS = ("custom", "l1", "ce_uniform", "ce_in", "ce_in_um", "full")


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and math.isfinite(value)
          and (value >= 0 if allow_zero else value > 0))
    if not ok:
        raise ConfigError(f"{key}: expected a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class GridConfig:
    """Bins of each box coordinate's distribution (ugs.make_grid)."""

    # R: logit-space deltas are clamped into [-R, R]. Chosen from tools/target_stats.py
    # (docs/ugs.md, "Choosing R"): R = 4 covers 99.9% of the decoder layers' targets at random init
    # and after training (every small-object target), while R = 2-3 would clamp medium/large boxes.
    range: float = 4.0
    alpha: float = 1.0  # exponential spacing (0 = uniform); paper best 1.0
    intervals: int = 16  # n: n+1 bins per coordinate, 4(n+1) outputs per box head
    kind: Literal["in", "uniform"] = "in"
    # R for the encoder-proposal head only; None = same as `range`. Its deltas start from the
    # fixed-size anchors (0.05 * 2^level), so its size targets are wider than the decoder's: the
    # 99.9th percentile of |y| is 5.0 at init and 4.2 after training, and 40-80% of large objects'
    # w/h targets lie outside +-4 (docs/ugs.md, "Choosing R"); 5 covers 99.9%.
    interm_range: float | None = 5.0

    def check(self) -> None:
        _positive(self.range, "ugs.grid.range")
        _positive(self.alpha, "ugs.grid.alpha", allow_zero=True)
        if self.intervals < 1 or self.intervals > 1024:
            raise ConfigError(f"ugs.grid.intervals: expected 1..1024, got {self.intervals}")
        if self.interm_range is not None:
            _positive(self.interm_range, "ugs.grid.interm_range")


@dataclass
class LossConfig:
    """Localisation losses on matched queries (criterion), normalised by num_boxes like DINO's."""

    box_loss: Literal["ce", "l1"] = "ce"  # ce: two-hot CE replaces L1; l1: L1 on decoded boxes
    # Weight of L_CE (mean over the 4 coordinates) in place of DINO's bbox coefficient 5.0. Eq. 16
    # adds L_loc with weight 1 next to the classification loss (coefficient 1 in DINO), and CE is in
    # nats (log(n+1) ~ 2.8 at init) rather than normalised-box L1 (~0.1 per coordinate), so 1.0.
    ce_weight: float = 1.0
    um_weight: float = 0.5  # lambda_1 (L_UM, entropy per coordinate, same normalisation)
    # Where CE and UM apply besides the last decoder layer. Where off, the box head still outputs
    # a distribution, decoded by expectation, and gets DINO's L1 (bbox coefficient) and no UM.
    aux_layers: bool = True  # decoder layers 0 .. L-2
    interm: bool = True  # encoder proposals
    dn: bool = True  # denoising positives (all decoder layers)

    def check(self) -> None:
        _positive(self.ce_weight, "ugs.loss.ce_weight", allow_zero=True)
        _positive(self.um_weight, "ugs.loss.um_weight", allow_zero=True)


@dataclass
class URConfig:
    """Uncertainty-guided refinement: a second decoder pass on perturbed encoder features."""

    weight: float = 0.5  # lambda_2; 0 skips the second pass entirely
    rho: float = 0.5  # perturbation radius per image and level (L2 over positions and channels)
    levels: list[int] | None = None  # encoder feature levels to perturb; None = all
    eps: float = 1e-12  # in delta = rho g / (||g|| + eps)

    def check(self) -> None:
        _positive(self.weight, "ugs.ur.weight", allow_zero=True)
        _positive(self.rho, "ugs.ur.rho", allow_zero=True)
        _positive(self.eps, "ugs.ur.eps")
        if self.levels is not None:
            levels = self.levels
            if not levels or any(lv < 0 for lv in levels) or len(set(levels)) != len(levels):
                raise ConfigError(f"ugs.ur.levels: expected distinct level indices >= 0 (or none = all), "
                                 f"got {self.levels}")


@dataclass
class InitConfig:
    zero_last_layer: bool = True  # zero weight and bias of each box head's 4(n+1) layer (docs/ugs.md)


@dataclass
class UGSConfig:
    enabled: bool = False
    ablation: Literal["custom", "l1", "ce_uniform", "ce_in", "ce_in_um", "full"] = "custom"
    grid: GridConfig = field(default_factory=GridConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ur: URConfig = field(default_factory=URConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        # During __init__ the sections do not exist yet; __post_init__ applies the row then.
        if name == "ablation" and "ur" in self.__dict__ and "loss" in self.__dict__:
            self._apply_row(str(value))

    def __post_init__(self) -> None:
        self._apply_row(self.ablation)  # UGSConfig(ablation="ce_in") means the same as setting it

    def _apply_row(self, row: str) -> None:
        if row == "custom":
            return
        if row not in ABLATION_ROWS:
            raise ConfigError(f"ugs.ablation: {row!r} is not one of {list(ABLATION_ROWS)}")
        if row == "l1":
            self.enabled = False
            return
        self.enabled = True
        self.loss.box_loss = "ce"
        self.grid.kind = "uniform" if row == "ce_uniform" else "in"
        if row in ("ce_uniform", "ce_in"):
            self.loss.um_weight = 0.0
        if row != "full":
            self.ur.weight = 0.0

    def row_violations(self) -> list[str]:
        """Fields that contradict `ablation` (empty for custom)."""
        row, bad = self.ablation, []
        if row == "custom":
            return bad
        if row == "l1":
            return [] if not self.enabled else ["enabled must be false"]
        if not self.enabled:
            bad.append("enabled must be true")
        if self.loss.box_loss != "ce":
            bad.append("loss.box_loss must be ce")
        want_kind = "uniform" if row == "ce_uniform" else "in"
        if self.grid.kind != want_kind:
            bad.append(f"grid.kind must be {want_kind}")
        um_on, ur_on = row in ("ce_in_um", "full"), row == "full"
        if (self.loss.um_weight > 0) != um_on:
            bad.append(f"loss.um_weight must be {'> 0' if um_on else '0'}")
        if (self.ur.weight > 0) != ur_on:
            bad.append(f"ur.weight must be {'> 0' if ur_on else '0'}")
        return bad

    def check(self) -> None:
        bad = self.row_violations()
        if bad:
            raise ConfigError(f"ugs.ablation={self.ablation}: " + "; ".join(bad) + " (an override after "
                             "the ablation row contradicts it; drop one, or use ugs.ablation=custom)")

    def grid_range(self, interm: bool = False) -> float:
        """R of the decoder box heads, or of the encoder-proposal head with interm=True."""
        if interm and self.grid.interm_range is not None:
            return self.grid.interm_range
        return self.grid.range
