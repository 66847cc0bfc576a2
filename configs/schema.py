"""The top-level config: one typed section per part of the system, and the checks across them."""
from __future__ import annotations

from dataclasses import dataclass, field

from configs.data import DataConfig
from configs.model import ModelConfig
from configs.errors import ConfigError
from configs.train import EvalConfig, OptimConfig, RuntimeConfig
from configs.ugs import UGSConfig

DATA_PATH_KEYS = ("train_images", "train_annotations", "val_images", "val_annotations")


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    ugs: UGSConfig = field(default_factory=UGSConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def check(self) -> None:
        """Checks that involve two sections (a data path nothing would read)."""
        if self.data.dataset == "synthetic":
            given = {k: getattr(self.data, k) for k in DATA_PATH_KEYS if getattr(self.data, k)}
            if given:
                listed = ", ".join(f"data.{k}={v!r}" for k, v in given.items())
                raise ConfigError(
                    f"{listed} given, but data.dataset='synthetic' generates its images and reads no "
                    "files. To use your files: --opt data.dataset=coco (or visdrone) with all four of "
                    f"data.{', data.'.join(DATA_PATH_KEYS)}; for synthetic data: leave the path(s) out")

    def check_detections_per_image(self) -> None:
        """eval.num_select fits the model's candidates; checked by the entry points that evaluate or
        predict, at start-up (the post-processor would fail at the first evaluation otherwise).
        Not part of check(): a converted checkpoint's config may change the class count first."""
        candidates = self.model.num_queries * self.model.num_classes
        if self.eval.num_select > candidates:
            raise ConfigError(
                f"eval.num_select={self.eval.num_select} exceeds model.num_queries x model.num_classes "
                f"= {self.model.num_queries} x {self.model.num_classes} = {candidates} (the detections "
                f"an image can have); lower it, e.g. --opt eval.num_select={candidates}")
