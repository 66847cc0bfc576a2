"""Swin Transformer backbone with the parameter names and numerics of the official DINO Swin.

Why our own module and not timm's or transformers' Swin: neither reproduces the official detection
backbone through a key map (docs/swin.md has the measured differences). The official behaviour kept
here:
- PatchEmbed pads the image on the right/bottom to a multiple of the patch size (4);
- every block pads its token grid to a multiple of the window and always uses the full window and
  its shift, however small the map (the padded tokens take part in attention as zero vectors);
- the shifted-window attention mask (-100 between regions) is built from the padded grid size on
  every forward, so any image size works;
- stage `i` in `out_indices` returns its output (before patch merging) through its own LayerNorm
  `norm{i}`;
- stochastic depth rises linearly from 0 to `drop_path_rate` over all blocks.

State-dict keys equal the official ones (`patch_embed.proj.weight`, `layers.0.blocks.1.attn.qkv.bias`,
`layers.0.downsample.reduction.weight`, `norm0.weight`, ...), so official DINO checkpoints load
under `backbone.0.` and ImageNet Swin checkpoints load into this module directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import stochastic_depth


@dataclass(frozen=True)
class SwinVariant:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    pretrain_img_size: int


# The five backbones the official DINO configs name (`args.backbone`).
SWIN_VARIANTS: dict[str, SwinVariant] = {
    "swin_T_224_1k": SwinVariant(96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_B_224_22k": SwinVariant(128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_B_384_22k": SwinVariant(128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
    "swin_L_224_22k": SwinVariant(192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
    "swin_L_384_22k": SwinVariant(192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}


def pad_bottom_right(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad a channels-last map (B, H, W, C) so that H and W are multiples of `multiple`."""
    pad_h = -x.shape[1] % multiple
    pad_w = -x.shape[2] % multiple
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def to_windows(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * windows, window * window, C), row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def from_windows(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of `to_windows` for a (padded) grid of size h x w."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def relative_position_index(window: int) -> Tensor:
    """(window^2, window^2) index into the (2 window - 1)^2 bias table for every token pair."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + window - 1
    d_col = cols[:, None] - cols[None, :] + window - 1
    return d_row * (2 * window - 1) + d_col


def shifted_window_mask(h: int, w: int, window: int, shift: int, device: torch.device,
                        dtype: torch.dtype) -> Tensor:
    """Additive mask (windows, window^2, window^2) for the cyclically shifted padded grid: 0 inside
    one of the 3 x 3 regions the roll brings together, -100 across regions (official value)."""
    def region(size: int) -> Tensor:
        ids = torch.zeros(size, dtype=torch.long, device=device)
        ids[size - window:size - shift] = 1
        ids[size - shift:] = 2
        return ids

    labels = (region(h)[:, None] * 3 + region(w)[None, :]).reshape(1, h, w, 1)
    labels = to_windows(labels, window).squeeze(-1)
    different = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(different.shape, dtype=dtype, device=device).masked_fill(different, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, windows: Tensor, shift_mask: Tensor | None) -> Tensor:
        """windows (B * nW, N, C); shift_mask (nW, N, N) additive, or None for unshifted windows."""
        bw, n, c = windows.shape
        qkv = self.qkv(windows).reshape(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(n, n, self.num_heads).permute(2, 0, 1)  # (heads, N, N)
        if shift_mask is None:  # one bias for every window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype))
        else:
            # window j of every image gets shift_mask[j]: windows are folded into the head dimension
            # (B, nW * heads, N, d) so that one (1, nW * heads, N, N) mask serves the whole batch
            nw = shift_mask.shape[0]
            attn_bias = (bias.unsqueeze(0) + shift_mask.unsqueeze(1)).reshape(1, nw * self.num_heads, n, n)
            q, k, v = (t.reshape(bw // nw, nw * self.num_heads, n, -1) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype))
            out = out.reshape(bw, self.num_heads, n, -1)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each a residual branch with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, drop_path: float,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.window, self.shift, self.drop_path = window, shift, drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _residual(self, x: Tensor) -> Tensor:
        return stochastic_depth(x, self.drop_path, "row", self.training) if self.drop_path > 0 else x

    def forward(self, x: Tensor, shift_mask: Tensor) -> Tensor:
        """x (B, H, W, C) -> same shape; `shift_mask` is used by shifted blocks only."""
        _, h, w, _ = x.shape
        y = pad_bottom_right(self.norm1(x), self.window)
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(to_windows(y, self.window), shift_mask if self.shift else None)
        y = from_windows(y, self.window, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self._residual(y[:, :h, :w])
        return x + self._residual(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods (odd sizes zero-padded) -> LayerNorm(4C) -> Linear(4C, 2C, no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_bottom_right(x, 2)
        b, h, w, c = x.shape
        # channel order of the official concatenation: (row 0, col 0), (1, 0), (0, 1), (1, 1)
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks alternating plain and shifted windows, then (except the last) PatchMerging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, drop_paths: Sequence[float],
                 downsample: bool, use_checkpoint: bool) -> None:
        super().__init__()
        self.window, self.shift = window, window // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else self.shift, drop_paths[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, H, W, C) -> (stage output (B, H, W, C), input of the next stage)."""
        hp = -(-x.shape[1] // self.window) * self.window
        wp = -(-x.shape[2] // self.window) * self.window
        mask = shifted_window_mask(hp, wp, self.window, self.shift, x.device, x.dtype)
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, ceil(H / 4), ceil(W / 4), C) channels-last."""
        pad_h, pad_w = -images.shape[2] % self.patch_size, -images.shape[3] % self.patch_size
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """forward(images (B, 3, H, W)) -> [features (B, C_i, H_i, W_i) for i in out_indices].

    `frozen_stages` as the official: 0 freezes the patch embedding, k >= 2 also stages 0..k-2
    (no gradient, eval mode); -1 trains everything (official DINO default).
    """

    def __init__(self, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int,
                 out_indices: Sequence[int] = (0, 1, 2, 3), drop_path_rate: float = 0.2,
                 frozen_stages: int = -1, use_checkpoint: bool = False, pretrain_img_size: int = 224) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"SwinTransformer: depths {list(depths)} and num_heads {list(num_heads)} "
                             "must have one entry per stage")
        if not out_indices or any(i < 0 or i >= len(depths) for i in out_indices):
            raise ValueError(f"SwinTransformer: out_indices {list(out_indices)} must be stage indices "
                             f"in 0..{len(depths) - 1}")
        self.pretrain_img_size = pretrain_img_size  # informational (no absolute position embedding)
        self.out_indices = list(out_indices)
        self.frozen_stages = frozen_stages
        self.patch_embed = PatchEmbed(embed_dim)
        # official rule (float32 linspace); on the host even when building on the meta device
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.num_features = [embed_dim * 2 ** i for i in range(len(depths))]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(SwinStage(self.num_features[i], depth, num_heads[i], window_size,
                                         drop_paths[start:start + depth], downsample=i < len(depths) - 1,
                                         use_checkpoint=use_checkpoint))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.num_channels = [self.num_features[i] for i in self.out_indices]
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.patch_embed, *self.layers[:max(0, self.frozen_stages - 1)]]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> SwinTransformer:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.patch_embed(images)
        outs = []
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous())
        return outs


def build_swin(name: str, out_indices: Sequence[int], frozen_stages: int = -1,
               use_checkpoint: bool = False, drop_path_rate: float = 0.2) -> SwinTransformer:
    """One of the official variants by its official name (drop path 0.2, as the official build)."""
    if name not in SWIN_VARIANTS:
        raise ValueError(f"Swin backbone '{name}': expected one of {list(SWIN_VARIANTS)}")
    v = SWIN_VARIANTS[name]
    return SwinTransformer(v.embed_dim, v.depths, v.num_heads, v.window_size, out_indices=out_indices,
                           drop_path_rate=drop_path_rate, frozen_stages=frozen_stages,
                           use_checkpoint=use_checkpoint, pretrain_img_size=v.pretrain_img_size)


def load_imagenet_swin(model: SwinTransformer, path: str) -> str:
    """Load an ImageNet Swin classification checkpoint (`{'model': state_dict}`, the layout of
    `swin_large_patch4_window12_384_22k.pth`) into the backbone alone, as the official `backbone_dir`.

    `head.*` (the classifier) is dropped; the classifier's fixed-size `attn_mask` buffers are ignored
    (the masks are rebuilt for every input size here); its final `norm` is reported unused and the
    per-stage `norm{i}` keep their fresh initialisation. Returns the import report; a tensor of
    another shape (e.g. a window-7 checkpoint for a window-12 model) is an error naming it.
    """
    from util.checkpoint import CheckpointError, extract_state_dict, import_weights, load_checkpoint

    try:
        state = extract_state_dict(load_checkpoint(path))
    except CheckpointError as exc:
        raise CheckpointError(f"model.backbone_weights: {exc}") from None
    if not any(k.startswith("patch_embed.") for k in state):
        is_dino = any(k.startswith("backbone.0.") for k in state)
        hint = (" (it looks like a DINO checkpoint: start from it with --pretrained / "
                "tools/import_official.py instead)" if is_dino else "")
        raise CheckpointError(f"model.backbone_weights={path}: no Swin backbone tensors ('patch_embed.*') "
                              f"found{hint}")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    ignored = sorted(k for k in state if k.endswith(".attn_mask"))
    state = {k: v for k, v in state.items() if k not in ignored}
    try:
        report = import_weights(model, state)
    except CheckpointError as exc:
        reason = str(exc).split("; pass skip_mismatched")[0]
        raise CheckpointError(f"model.backbone_weights={path}: {reason}; the checkpoint is for another Swin "
                              "variant than model.backbone (window size and widths must match)") from None
    report.ignored.extend(ignored)
    return f"ImageNet Swin weights {path}:\n{report}"
