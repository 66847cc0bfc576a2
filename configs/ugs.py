"""UGS section of the config (the method and our choices: docs/ugs.md).

The defaults hold the paper's best values (lambda_1 = lambda_2 = rho = 0.5, alpha = 1) with the
method switched off (`enabled = False`), so a DINO config is the L1 baseline and a `*_ugs` config
turns it on. Each row of the paper's ablation (Table 6), plus the Smooth-L1 baseline, is one
override of `ablation` (table in `ABLATION_ROWS`):

    ugs.ablation=l1               L1 baseline (DINO)     enabled=False
    ugs.ablation=smooth_l1        Smooth-L1, beta 1      on the logit-space offsets, 4-output head
    ugs.ablation=smooth_l1_ninth  Smooth-L1, beta 1/9    idem
    ugs.ablation=ce_uniform       CE, uniform grid       um=0, ur=0
    ugs.ablation=ce_in            CE + IN grid           um=0, ur=0
    ugs.ablation=ce_in_um         + UM                   um=0.5, ur=0
    ugs.ablation=full             + UR                   um=0.5, ur=0.5, rho=0.5

`apply_ablation_row(ugs_cfg, row)` writes every field the row controls (to the paper's value or to
0), whatever the config held before, and records the row in `ablation`; `apply_overrides` calls it
for a `ugs.ablation=<row>` override, in order with the other overrides, so an override after the
row can still change a weight (`ugs.loss.um_weight=0.3`). `check()` rejects a config that
contradicts its row's switches (a component switched on or off against the row);
`ablation=custom` (the default) imposes nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from configs.errors import ConfigError

# The paper's best values, which the rows write (ugs_method.md sections 3, 7, 8).
PAPER_ALPHA, PAPER_UM_WEIGHT, PAPER_UR_WEIGHT, PAPER_RHO = 1.0, 0.5, 0.5, 0.5

# row -> {dotted field under `ugs`: value}. A row sets every field it controls; "custom" none.
_CE = {"enabled": True, "loss.box_loss": "ce", "grid.alpha": PAPER_ALPHA}
_OFFSETS = {"enabled": True, "loss.box_loss": "smooth_l1", "loss.um_weight": 0.0, "ur.weight": 0.0}
ABLATION_ROWS: dict[str, dict[str, object]] = {
    "custom": {},
    "l1": {"enabled": False},
    "smooth_l1": {**_OFFSETS, "loss.smooth_l1_beta": 1.0},
    "smooth_l1_ninth": {**_OFFSETS, "loss.smooth_l1_beta": 1.0 / 9.0},
    "ce_uniform": {**_CE, "grid.kind": "uniform", "loss.um_weight": 0.0, "ur.weight": 0.0},
    "ce_in": {**_CE, "grid.kind": "in", "loss.um_weight": 0.0, "ur.weight": 0.0},
    "ce_in_um": {**_CE, "grid.kind": "in", "loss.um_weight": PAPER_UM_WEIGHT, "ur.weight": 0.0},
    "full": {**_CE, "grid.kind": "in", "loss.um_weight": PAPER_UM_WEIGHT, "ur.weight": PAPER_UR_WEIGHT,
             "ur.rho": PAPER_RHO},
}
# Fields a later override may tune without leaving the row: weights may change but not switch
# on or off (checked as > 0 vs 0); these may take any valid value.
_TUNABLE = {"grid.alpha", "ur.rho", "loss.smooth_l1_beta"}
_WEIGHTS = {"loss.um_weight", "ur.weight"}


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

    # ce: two-hot CE replaces L1; l1: L1 on the decoded boxes (distribution head kept);
    # smooth_l1: the paper's baseline, Smooth-L1 on the logit-space offsets the CE targets use,
    # predicted directly by DINO's 4-output head (no bins, so no UM and no UR)
    box_loss: Literal["ce", "l1", "smooth_l1"] = "ce"
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
    # Smooth-L1 on the offsets: sum over the 4 coordinates (like the L1 it replaces), / num_boxes
    smooth_l1_beta: float = 1.0  # quadratic below beta (1.0, or 1/9 as in Faster R-CNN)
    smooth_l1_weight: float = 1.0

    def check(self) -> None:
        _positive(self.ce_weight, "ugs.loss.ce_weight", allow_zero=True)
        _positive(self.um_weight, "ugs.loss.um_weight", allow_zero=True)
        _positive(self.smooth_l1_beta, "ugs.loss.smooth_l1_beta")
        _positive(self.smooth_l1_weight, "ugs.loss.smooth_l1_weight", allow_zero=True)


@dataclass
class URConfig:
    """Uncertainty-guided refinement: a second decoder pass on perturbed encoder features."""

    weight: float = 0.5  # lambda_2; 0 skips the second pass entirely
    rho: float = 0.5  # perturbation radius per image and level (L2 over positions and channels)
    levels: list[int] | None = None  # encoder feature levels to perturb; None = all
    eps: float = 1e-12  # in delta = rho g / (||g|| + eps)
    # false: one joint pass, all levels perturbed at once (cheaper); true: the paper's literal
    # sum over levels of L_UR^l, one decoder pass per level with only that level perturbed
    per_level: bool = False

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
class MatchConfig:
    """The Hungarian matcher's box term (our choice: the paper says nothing of matching; docs/ugs.md)."""

    # expectation: DINO's L1 on the boxes decoded by expectation; bins: the two-hot CE of each
    # query's bin distributions against each target (the loss's quantity), on the sets where the
    # CE loss is on (ugs.loss.aux_layers / interm), each on its own grid; the others keep L1
    box_cost: Literal["expectation", "bins"] = "expectation"
    # weight of the bins cost; None mirrors the loss as DINO's L1 cost does (5 and 5):
    # ugs.loss.ce_weight * model.set_cost_bbox / model.bbox_loss_coef
    ce_cost: float | None = None

    def check(self) -> None:
        if self.ce_cost is not None:
            _positive(self.ce_cost, "ugs.match.ce_cost", allow_zero=True)


@dataclass
class InitConfig:
    zero_last_layer: bool = True  # zero weight and bias of each box head's 4(n+1) layer (docs/ugs.md)


@dataclass
class UGSConfig:
    enabled: bool = False
    ablation: Literal["custom", "l1", "smooth_l1", "smooth_l1_ninth", "ce_uniform", "ce_in", "ce_in_um",
                      "full"] = "custom"
    grid: GridConfig = field(default_factory=GridConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ur: URConfig = field(default_factory=URConfig)
    init: InitConfig = field(default_factory=InitConfig)
    match: MatchConfig = field(default_factory=MatchConfig)

    def row_violations(self) -> list[str]:
        """Fields that contradict `ablation`'s switches (empty for custom and for `l1`, whose
        other fields are unused)."""
        row = ABLATION_ROWS.get(self.ablation)
        if row is None:
            return [f"{self.ablation!r} is not one of {list(ABLATION_ROWS)}"]
        if not self.enabled and not row.get("enabled", True):
            return []
        bad = []
        for key, want in row.items():
            if key in _TUNABLE:
                continue
            have = _get(self, key)
            if key in _WEIGHTS:
                if (have > 0) != (want > 0):
                    bad.append(f"{key} must be {'> 0' if want > 0 else '0'}")
            elif have != want:
                bad.append(f"{key} must be {str(want).lower() if isinstance(want, bool) else want}")
        return bad

    def check(self) -> None:
        bad = self.row_violations()
        if bad:
            raise ConfigError(f"ugs.ablation={self.ablation}: " + "; ".join(bad) + " (an override after "
                             "the ablation row contradicts it; drop one, or use ugs.ablation=custom)")
        if self.enabled and self.loss.box_loss == "smooth_l1" and (self.loss.um_weight > 0 or self.ur.weight > 0):
            raise ConfigError("ugs.loss.box_loss=smooth_l1 predicts offsets with a 4-output head: no bins, "
                              "so ugs.loss.um_weight and ugs.ur.weight must be 0")
        if self.enabled and self.match.box_cost == "bins" and self.loss.box_loss != "ce":
            raise ConfigError(f"ugs.match.box_cost=bins costs with the CE loss, which is off with "
                              f"ugs.loss.box_loss={self.loss.box_loss}: use ugs.loss.box_loss=ce or "
                              "ugs.match.box_cost=expectation")

    def grid_range(self, interm: bool = False) -> float:
        """R of the decoder box heads, or of the encoder-proposal head with interm=True."""
        if interm and self.grid.interm_range is not None:
            return self.grid.interm_range
        return self.grid.range


def _get(section: object, dotted: str) -> object:
    for part in dotted.split("."):
        section = getattr(section, part)
    return section


def apply_ablation_row(u: UGSConfig, row: str) -> UGSConfig:
    """Set `u.ablation = row` and every field the row controls (ABLATION_ROWS), in place; returns
    `u`. Works from any starting config: a row does not depend on what was there before."""
    if row not in ABLATION_ROWS:
        raise ConfigError(f"ugs.ablation: {row!r} is not one of {list(ABLATION_ROWS)}")
    u.ablation = row  # type: ignore[assignment]
    for key, value in ABLATION_ROWS[row].items():
        *path, name = key.split(".")
        setattr(_get(u, ".".join(path)) if path else u, name, value)
    return u
