"""Exponential moving average of model weights (official DINO `use_ema`, decay 0.9997)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Keeps `ema = decay * ema + (1 - decay) * model` for every floating parameter and buffer,
    updated after each optimizer step. Integer buffers are copied. The averaged model lives on the
    same device as the model, in eval mode, with gradients off.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # named_parameters/named_buffers list a shared tensor once (DINO's shared heads appear
        # under 12 names in the state_dict); updating through state_dict would average it 12 times.
        model_tensors = dict(model.named_parameters())
        model_tensors.update(model.named_buffers())
        ema_tensors = list(self.module.named_parameters()) + list(self.module.named_buffers())
        for name, ema_value in ema_tensors:
            value = model_tensors[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(self.decay).add_(value.to(ema_value.dtype), alpha=1.0 - self.decay)
            else:
                ema_value.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "decay": self.decay,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.decay = float(state.get("decay", self.decay))
        self.num_updates = int(state.get("num_updates", 0))
