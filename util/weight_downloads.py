"""Backbone weights that building a model downloads: what, from where, and what to do offline.

`model.backbone_weights` makes the model builder fetch ImageNet weights (torchvision's weight
enums, or timm's Hugging Face hub files) unless they are cached. A run that loads a checkpoint
right after building replaces them, so main.py builds without them then (no download at all);
when a download is needed and fails, `explain_download_failure` turns the network error into
one message naming the file, its address, the local cache path and the command-line ways out.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

OFFICIAL_DINO_RELEASES = "https://github.com/IDEA-Research/DINO#model-zoo"


class WeightsDownloadError(RuntimeError):
    """Backbone weights that had to be downloaded and could not be."""


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's pretrained weights come from and where they are cached."""

    description: str      # e.g. "torchvision ResNet50_Weights.IMAGENET1K_V1"
    url: str
    cache_hint: str       # the local file (or folder) the download goes to


def backbone_weights_source(backbone: str, weights: str) -> WeightsSource:
    """What building `backbone` with `weights` downloads when it is not cached."""
    if backbone.startswith("timm:"):
        import timm

        arch = backbone[len("timm:"):]
        cfg = timm.models.get_pretrained_cfg(arch)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        url = f"https://huggingface.co/{hub_id}" if hub_id else (getattr(cfg, "url", "") or "(unknown)")
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return WeightsSource(f"timm {arch} pretrained weights", url,
                             f"the Hugging Face cache {home} (HF_HOME moves it; HF_HUB_OFFLINE=1 uses "
                             "only the cache)")
    import torch
    import torchvision

    enum = torchvision.models.get_model_weights(backbone)
    url = enum[weights].url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return WeightsSource(f"torchvision {enum.__name__}.{weights}", url,
                         f"{cached} (the torch hub cache; TORCH_HOME moves it)")


def check_backbone_weights_name(backbone: str, weights: str | None) -> None:
    """A torchvision weights name that does not exist, or a local weights file that does not, is
    a config error before anything is built."""
    from configs import ConfigError
    from models.backbone import is_weights_file

    if is_weights_file(weights):
        if not os.path.isfile(weights):
            raise ConfigError(f"model.backbone_weights={weights!r}: no such file (a local state dict of "
                              f"the {backbone} backbone; or a torchvision weights name, or null)")
        return
    if weights is None or backbone.startswith("timm:"):
        return
    import torchvision

    names = list(torchvision.models.get_model_weights(backbone).__members__)
    if weights not in names:
        raise ConfigError(f"model.backbone_weights={weights!r} is not a torchvision weights name of "
                          f"{backbone}; choices: {names}, or null for no ImageNet initialisation")


def is_network_error(exc: BaseException) -> bool:
    """Errors of a failed download: URLError, socket and HTTP errors, Hugging Face hub errors
    (all OSError), or a truncated download's hash mismatch."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "hash" in str(exc).lower())


def download_failure_message(backbone: str, weights: str, exc: BaseException) -> str:
    try:
        source = backbone_weights_source(backbone, weights)
        what = f"{source.description} from {source.url}"
        name = os.path.basename(source.url) if source.url.endswith((".pth", ".safetensors")) else "FILE.pth"
        where = f"point at it: --opt model.backbone_weights=/path/to/{name}, or put it at {source.cache_hint}"
    except Exception:  # noqa: BLE001 - the message must not fail; say what is known
        what = f"{backbone} weights {weights}"
        where = "point at it: --opt model.backbone_weights=/path/to/FILE.pth"
    return (f"model.backbone_weights={weights!r}: downloading the ImageNet weights of the {backbone} "
            f"backbone failed ({type(exc).__name__}: {str(exc).strip()[:200]}).\n"
            f"  It needs {what}. Ways out:\n"
            f"  - offline: download that file on a machine with access, then {where};\n"
            f"  - start from a full DINO checkpoint, whose weights replace the backbone's (nothing is "
            f"downloaded then): --pretrained CHECKPOINT.pth (official DINO releases: "
            f"{OFFICIAL_DINO_RELEASES}), or --resume CHECKPOINT.pth / --eval --resume CHECKPOINT.pth;\n"
            f"  - no ImageNet initialisation: --opt model.backbone_weights=null (the backbone starts "
            f"from random weights).")


@contextlib.contextmanager
def explain_download_failure(backbone: str, weights: str | None) -> Iterator[None]:
    """Re-raise a network error from inside the block as a WeightsDownloadError with the ways out."""
    try:
        yield
    except Exception as exc:
        if weights is None or not is_network_error(exc):
            raise
        raise WeightsDownloadError(download_failure_message(backbone, weights, exc)) from exc
