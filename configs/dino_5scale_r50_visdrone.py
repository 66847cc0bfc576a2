"""DINO-5scale ResNet-50 on VisDrone-DET (converted to COCO format): the COCO config with
10 classes, up to 1500 detections per image, and the small-object data policy."""
from __future__ import annotations

from configs.dino_5scale_r50_coco import config as coco_config
from configs.schema import Config


def config() -> Config:
    cfg = coco_config()
    cfg.name = "dino_5scale_r50_visdrone"
    cfg.model.num_classes = 10            # VisDrone ids 1..10 -> labels 0..9
    cfg.model.dn_labelbook_size = 10
    cfg.data.dataset = "visdrone"
    cfg.data.label_mapping = "contiguous"
    cfg.data.train_policy = "small_object"  # larger scales and object-keeping crops (configs/data.py)
    # evaluate at the top of the small_object training scales (640..1024, longer side <= 1600)
    cfg.data.eval_size = 1024
    cfg.data.eval_max_size = 1600
    # Dense scenes: keep up to 1500 detections per image (COCO's cap of 100 truncates recall).
    cfg.eval.max_dets = 1500
    cfg.eval.num_select = 1500
    return cfg
