"""Model section of the config (DINO-5scale, docs/dino.md "Configuration"). Read only by models/build.py.

Defaults are the official DINO-5scale ResNet-50 COCO values. Only options the code supports are
here; official options with other behaviour (two-stage types, box attention, patterns, ...) are
rejected by `configs.official.from_official_args`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from configs.errors import ConfigError

TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
# The official DINO Swin backbones, by their official names (models/swin.py SWIN_VARIANTS).
SWIN_BACKBONES = ("swin_T_224_1k", "swin_B_224_22k", "swin_B_384_22k", "swin_L_224_22k", "swin_L_384_22k")


@dataclass
class ModelConfig:
    # --- backbone ------------------------------------------------------------------------------
    # torchvision ResNet with frozen batch norm (official key names), an official Swin name
    # (SWIN_BACKBONES, e.g. "swin_L_384_22k"; docs/swin.md), or "timm:<model name>" (timm
    # `features_only`; every backbone parameter then trains).
    backbone: str = "resnet50"
    # ResNet: torchvision weights enum name loaded at build time (official: ImageNet). Swin: path
    # of an ImageNet Swin checkpoint (official release layout, e.g.
    # swin_large_patch4_window12_384_22k.pth), loaded into the backbone alone. timm: any value means
    # "pretrained=True". A ResNet/timm value ending in .pth/.pt/.safetensors loads that local file
    # instead (offline: the file torchvision or timm would download). None = random init (enough
    # when an official DINO checkpoint is loaded afterwards with --pretrained).
    backbone_weights: str | None = "IMAGENET1K_V1"
    # Swin only (official options): stages kept frozen (-1 none, 0 the patch embedding, k >= 2 also
    # stages 0..k-2), stochastic depth of the last block (linear from 0), and activation
    # checkpointing of every Swin block (the official Swin-L configs train with it).
    backbone_frozen_stages: int = -1
    backbone_drop_path_rate: float = 0.2
    backbone_use_checkpoint: bool = False
    # Backbone stages fed to the transformer: 0..3 = layer1..layer4 (strides 4..32).
    return_interm_indices: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # Sine encoding of feature maps: temperature 20 on both axes (not 10000).
    pe_temperature_h: float = 20.0
    pe_temperature_w: float = 20.0

    # --- transformer ---------------------------------------------------------------------------
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    num_queries: int = 900
    # Backbone stages + extra stride-2 levels (the 5th level of DINO-5scale).
    num_feature_levels: int = 5
    enc_n_points: int = 4
    dec_n_points: int = 4
    # Activation checkpointing of the encoder layers (training only): less memory, ~1 extra
    # encoder forward per step.
    use_checkpoint: bool = False
    # torch.compile each decoder layer (dynamic shapes; first steps compile, ~30 s on a CPU). On a
    # GPU the decoder's 900-query kernels are launch-bound and compiling fuses its element-wise
    # operators; UGS's UR pass runs the decoder twice more (gradient pass, second pass), so it
    # gains most. Off by default: eager is the reference and compiling costs start-up time.
    compile_decoder_layers: bool = False

    # --- classes and contrastive denoising ------------------------------------------------------
    num_classes: int = 91
    dn_number: int = 100  # 0 disables denoising
    # The official config file says 0.4, but the official training scripts pass
    # `--options dn_box_noise_scale=1.0` (the paper's setting); we default to what they train with.
    dn_box_noise_scale: float = 1.0
    dn_label_noise_ratio: float = 0.5  # each dn label flips with probability ratio / 2
    dn_labelbook_size: int = 91  # label_enc has dn_labelbook_size + 1 rows; must be >= num_classes

    # --- matcher -------------------------------------------------------------------------------
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    focal_alpha: float = 0.25
    # Host threads solving a step's per-image assignments (the GPU waits for them; dense images
    # make them slow). 0: the CPUs of this process shared among this node's processes, at most 8.
    matcher_threads: int = 0

    # --- loss weights (auxiliary, encoder and denoising sets reuse them) ------------------------
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    interm_loss_coef: float = 1.0
    no_interm_box_loss: bool = False

    def check(self) -> None:
        """Validate after overrides; each error names the field."""
        name = self.backbone
        known = TORCHVISION_BACKBONES + SWIN_BACKBONES
        if not (name in known or (name.startswith("timm:") and len(name) > 5)):
            raise ConfigError(f"model.backbone: '{name}' is not one of {list(known)} or 'timm:<model name>'")
        if name in SWIN_BACKBONES and self.backbone_weights is not None and \
                self.backbone_weights.upper().startswith("IMAGENET1K"):
            raise ConfigError(f"model.backbone_weights: for the Swin backbone '{name}' give the path of an "
                              f"ImageNet Swin checkpoint (.pth) or none, not the torchvision name "
                              f"'{self.backbone_weights}'")
        if self.backbone_frozen_stages < -1 or self.backbone_frozen_stages > 4:
            raise ConfigError("model.backbone_frozen_stages must be in -1..4, got "
                              f"{self.backbone_frozen_stages}")
        if not 0.0 <= self.backbone_drop_path_rate < 1.0:
            raise ConfigError("model.backbone_drop_path_rate must be in [0, 1), got "
                              f"{self.backbone_drop_path_rate}")
        idx = self.return_interm_indices
        too_deep = bool(idx) and idx[-1] > 3 and not name.startswith("timm:")
        if not idx or sorted(set(idx)) != list(idx) or idx[0] < 0 or too_deep:
            raise ConfigError("model.return_interm_indices must be increasing stage indices in 0..3 "
                              f"(timm: its feature indices), got {idx}")
        if self.num_feature_levels < len(idx):
            raise ConfigError(f"model.num_feature_levels ({self.num_feature_levels}) must be >= the "
                              "number of "
                              f"backbone stages in model.return_interm_indices ({len(idx)})")
        if self.hidden_dim % 32 != 0:
            raise ConfigError(f"model.hidden_dim must be a multiple of 32 (GroupNorm(32) in the input "
                              f"projections), got {self.hidden_dim}")
        if self.hidden_dim % self.nheads != 0:
            raise ConfigError(f"model.hidden_dim ({self.hidden_dim}) must be divisible by "
                              f"model.nheads ({self.nheads})")
        positive = ("nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "enc_n_points",
                    "dec_n_points", "num_classes", "dn_labelbook_size")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.dn_number < 0:
            raise ConfigError(f"model.dn_number must be >= 0 (0 disables denoising), got {self.dn_number}")
        if self.dn_box_noise_scale < 0:
            raise ConfigError(f"model.dn_box_noise_scale must be >= 0, got {self.dn_box_noise_scale}")
        if not 0.0 <= self.dn_label_noise_ratio <= 1.0:
            raise ConfigError("model.dn_label_noise_ratio must be in [0, 1], got "
                              f"{self.dn_label_noise_ratio}")
        if self.dn_labelbook_size < self.num_classes:
            raise ConfigError(f"model.dn_labelbook_size ({self.dn_labelbook_size}) must be >= "
                              "model.num_classes "
                              f"({self.num_classes})")
        if not 0.0 < self.focal_alpha < 1.0:
            raise ConfigError(f"model.focal_alpha must be in (0, 1), got {self.focal_alpha}")
        if self.matcher_threads < 0:
            raise ConfigError(f"model.matcher_threads must be >= 0 (0: automatic), got {self.matcher_threads}")
        if min(self.set_cost_class, self.set_cost_bbox, self.set_cost_giou) < 0 or \
                self.set_cost_class + self.set_cost_bbox + self.set_cost_giou == 0:
            raise ConfigError("model.set_cost_class/bbox/giou must be >= 0 and not all 0")
        for key in ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "interm_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}")
