"""Backbone: ResNet with frozen batch norm (official names), an official-layout Swin Transformer
(models/swin.py), or a timm `features_only` model.

Module layout matches the official checkpoint: `backbone` is a 2-element Sequential (the
official `Joiner`) whose index 1 is the parameter-free position encoder and whose index 0 holds
the network: a ResNet under `body` (torchvision names, e.g. `backbone.0.body.layer1.0.conv1.weight`),
a Swin directly (`backbone.0.patch_embed.proj.weight`, `backbone.0.norm3.bias`). See docs/dino.md,
"Backbone", and docs/swin.md.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from models.position_encoding import PositionEmbeddingSine
from models.swin import SWIN_VARIANTS, build_swin, load_imagenet_swin


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine: four buffers, no `num_batches_tracked`.

    y = x * scale + shift with scale = weight * rsqrt(running_var + 1e-5) (official numerics).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: ANN001 - torch signature
        # torchvision / BatchNorm checkpoints carry a step counter that a frozen norm has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift


WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


def is_weights_file(weights: str | None) -> bool:
    """`weights` names a local file (offline use) rather than a torchvision weights name."""
    return weights is not None and weights.endswith(WEIGHT_FILE_SUFFIXES)


def load_backbone_file(net: nn.Module, path: str) -> None:
    """The backbone's ImageNet weights from a local state-dict file (the file torchvision or timm
    would download), strictly: every tensor of the network, nothing else."""
    from util.checkpoint import CheckpointError, import_weights, load_weights_file

    report = import_weights(net, load_weights_file(path), num_classes_changed_ok=False)
    if report.missing or report.unexpected:
        raise CheckpointError(f"model.backbone_weights={path}: not a state dict of this backbone "
                              f"({len(report.missing)} tensors missing, e.g. {report.missing[:2]}; "
                              f"{len(report.unexpected)} unexpected, e.g. {report.unexpected[:2]})")


class ResNetBody(nn.Module):
    """A torchvision ResNet without avgpool/fc, returning the requested stages (layer1..layer4).

    Child names are torchvision's, so keys read `body.conv1.weight`, `body.layer2.0.bn1.running_var`.
    """

    def __init__(self, name: str, return_interm_indices: Sequence[int], weights: str | None) -> None:
        super().__init__()
        if name not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"backbone '{name}': expected resnet18/34/50/101 or 'timm:<model name>'")
        local = is_weights_file(weights)
        net = getattr(torchvision.models, name)(weights=None if local else weights,
                                                norm_layer=FrozenBatchNorm2d,
                                                replace_stride_with_dilation=[False, False, False])
        if local:
            load_backbone_file(net, weights)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.return_interm_indices = list(return_interm_indices)
        widths = [64, 128, 256, 512] if name in ("resnet18", "resnet34") else [256, 512, 1024, 2048]
        self.num_channels = [widths[i] for i in self.return_interm_indices]
        # Official: only layer2-4 train; the stem and layer1 stay frozen.
        for pname, param in self.named_parameters():
            if not any(stage in pname for stage in ("layer2", "layer3", "layer4")):
                param.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if i in self.return_interm_indices:
                outs.append(x)
        return outs


def timm_body(name: str, return_interm_indices: Sequence[int],
              pretrained: bool | str) -> tuple[nn.Module, list[int]]:
    """A timm model with `features_only=True` (indices are timm's feature indices, e.g. for timm
    ResNets 1..4 = layer1..layer4) and its output channels. Every parameter trains."""
    import timm  # only needed for this option

    overlay = {"file": pretrained} if isinstance(pretrained, str) else None  # a local weights file
    model = timm.create_model(name, pretrained=bool(pretrained), features_only=True,
                              out_indices=tuple(return_interm_indices), pretrained_cfg_overlay=overlay)
    return model, list(model.feature_info.channels())


class BackboneBody(nn.Module):
    """Index 0 of the Joiner: holds `body` so keys are `backbone.0.body.*`; body(x) -> list of maps."""

    def __init__(self, body: nn.Module, num_channels: Sequence[int]) -> None:
        super().__init__()
        self.body = body
        self.num_channels: list[int] = list(num_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x))


def downsample_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Image padding mask (B, H, W) -> (B, h, w) by nearest interpolation (official)."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class Backbone(nn.Sequential):
    """Official `Joiner`: [BackboneBody, PositionEmbeddingSine].

    forward(images (B, 3, H, W), masks (B, H, W) True on padding) -> (features, masks, pos),
    lists over returned stages: features (B, C_l, h_l, w_l), masks (B, h_l, w_l), pos (B, d, h_l, w_l).
    """

    def __init__(self, body: nn.Module, position_encoding: PositionEmbeddingSine) -> None:
        super().__init__(body, position_encoding)
        self.num_channels = body.num_channels

    def forward(self, images: Tensor, masks: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        features = self[0](images)
        level_masks = [downsample_mask(masks, f.shape[-2:]) for f in features]
        pos = [self[1](m, f.dtype).to(f.dtype) for f, m in zip(features, level_masks)]
        return features, level_masks, pos


def build_backbone(name: str, return_interm_indices: Sequence[int], hidden_dim: int,
                   temperature_h: float, temperature_w: float, weights: str | None, *,
                   frozen_stages: int = -1, use_checkpoint: bool = False,
                   drop_path_rate: float = 0.2) -> Backbone:
    """`name` is a torchvision ResNet ('resnet50'; `weights` a torchvision weights name), an official
    Swin name ('swin_L_384_22k'; `weights` the path of an ImageNet Swin checkpoint, and
    `frozen_stages`, `use_checkpoint`, `drop_path_rate` as the official Swin) or 'timm:<model>'
    (ImageNet weights if `weights`: any value for timm, or a local .pth/.safetensors file)."""
    position_encoding = PositionEmbeddingSine(hidden_dim // 2, temperature_h, temperature_w)
    if name in SWIN_VARIANTS:
        swin = build_swin(name, return_interm_indices, frozen_stages=frozen_stages,
                          use_checkpoint=use_checkpoint, drop_path_rate=drop_path_rate)
        if weights is not None:
            print(load_imagenet_swin(swin, weights), flush=True)
        return Backbone(swin, position_encoding)
    if name.startswith("timm:"):
        pretrained = weights if is_weights_file(weights) else weights is not None
        body, channels = timm_body(name[len("timm:"):], return_interm_indices, pretrained=pretrained)
    else:
        body = ResNetBody(name, return_interm_indices, weights)
        channels = body.num_channels
    return Backbone(BackboneBody(body, channels), position_encoding)
