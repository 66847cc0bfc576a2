"""Exponential moving average of model weights (official DINO `use_ema`, decay 0.9997), on
torch's `AveragedModel` with `get_ema_multi_avg_fn`."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def _ema_floats_copy_integers(decay: float):  # noqa: ANN202
    """torch's EMA update for floating tensors; integer buffers (counters) are copied, since
    averaging them would truncate. AveragedModel passes tensors grouped by dtype."""
    ema = get_ema_multi_avg_fn(decay)

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        if averaged[0].is_floating_point():
            ema(averaged, current, num_averaged)
        else:
            torch._foreach_copy_(averaged, current)

    return update


class ModelEMA:
    """Keeps `ema = decay * ema + (1 - decay) * model` for every floating parameter and buffer,
    updated after each optimizer step. Integer buffers are copied. The averaged model (`module`)
    lives on the same device as the model, in eval mode, with gradients off.

    A tensor shared under several names (DINO's shared heads appear under 12 names in the
    state_dict) is averaged once: AveragedModel walks parameters(), which lists it once.
    `state_dict()` keeps the checkpoint layout {"model", "decay", "num_updates"}.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=_ema_floats_copy_integers(decay), use_buffers=True)
        # AveragedModel's first update copies the model; here the copy taken now is the starting
        # average, so every update already blends (official DINO's ModelEma)
        self.averaged.n_averaged.fill_(1)
        self.module = self.averaged.module.eval().requires_grad_(False)

    @property
    def num_updates(self) -> int:
        return int(self.averaged.n_averaged) - 1

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.decay = float(state.get("decay", self.decay))
        self.averaged.multi_avg_fn = _ema_floats_copy_integers(self.decay)
        self.averaged.n_averaged.fill_(int(state.get("num_updates", 0)) + 1)
