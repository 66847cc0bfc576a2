"""Tiny stand-ins for the model, criterion, post-processor and data, with the official contracts,
so the training/evaluation machinery (main.run, util/engine.py) is tested on its own in seconds.

Run as a script it is the entry point of the multi-process test:
    torchrun --nproc_per_node 2 tests/engine_fakes.py OUT_DIR [main.py options...]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from util.box_ops import inverse_sigmoid  # noqa: E402

NUM_CLASSES = 2
MAX_OBJECTS = 3
SIZE = 32



def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; each run() in a test starts from scratch."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    GradientState._reset_state()
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()

class FakeDataset(torch.utils.data.Dataset):
    """Image i has 1-3 boxes; their cxcywh and labels are written into pixel row 0 (so the fake
    model can "see" them), plus noise from the global torch RNG (an augmentation whose stream
    an exact resume must restore)."""

    label_to_category_id = {0: 1, 1: 2}
    categories = [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]

    def __init__(self, n: int, seed: int, augment: bool) -> None:
        self.n, self.seed, self.augment = n, seed, augment

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        k = int(torch.randint(1, MAX_OBJECTS + 1, (1,), generator=g))
        centres = 0.2 + 0.6 * torch.rand(k, 2, generator=g)
        sizes = 0.1 + 0.2 * torch.rand(k, 2, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (k,), generator=g)
        image = torch.randn(3, SIZE, SIZE, generator=g)
        return image, torch.cat([centres, sizes], 1), labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        image, boxes, labels = self.item(i)
        if self.augment:
            image = image + 0.01 * torch.randn(image.shape)
        # What the fake model "sees": the boxes with an image-specific error of a few pixels,
        # so AP is informative (neither 0 nor 1).
        jitter = 0.06 * (torch.rand(boxes.shape, generator=torch.Generator().manual_seed(i)) - 0.5)
        image[0, 0, :4 * len(boxes)] = (boxes + jitter).reshape(-1)
        image[1, 0, :len(labels)] = labels.float()
        image[2, 0, 0] = len(labels)
        size = torch.tensor([SIZE, SIZE])
        return image, {"boxes": boxes.float(), "labels": labels, "image_id": torch.tensor(i + 1),
                       "orig_size": size, "size": size.clone(), "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
                       "area": (boxes[:, 2] * boxes[:, 3] * SIZE * SIZE).float(),
                       "ignore_boxes": torch.zeros(0, 4)}

    def coco_gt(self) -> dict:
        anns = []
        for i in range(self.n):
            _, boxes, labels = self.item(i)
            for b, lab in zip(boxes.tolist(), labels.tolist()):
                cx, cy, w, h = (v * SIZE for v in b)
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": lab + 1,
                             "bbox": [cx - w / 2, cy - h / 2, w, h], "area": w * h, "iscrowd": 0})
        return {"images": [{"id": i + 1, "height": SIZE, "width": SIZE} for i in range(self.n)],
                "annotations": anns, "categories": [dict(c) for c in self.categories]}


class FakeDINO(nn.Module):
    """Reads the encoded boxes and nudges them with learned heads; official output keys.
    Parameter names mimic the official ones the optimiser groups look for."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())])
        self.sampling_offsets = nn.Linear(8, 8)
        self.box_head = nn.Linear(8, 4 * (MAX_OBJECTS + 1))
        self.class_head = nn.Linear(8, NUM_CLASSES * (MAX_OBJECTS + 1))
        nn.init.zeros_(self.box_head.weight)
        nn.init.zeros_(self.box_head.bias)

    def forward(self, images: torch.Tensor, masks: torch.Tensor, targets: list | None = None) -> dict:
        B = images.shape[0]
        Q = MAX_OBJECTS + 1
        feats = self.sampling_offsets(self.backbone[0](images).mean((2, 3)))  # (B, 8)
        encoded = torch.full((B, Q, 4), 0.05, dtype=images.dtype, device=images.device)
        encoded[:, :MAX_OBJECTS] = images[:, 0, 0, :4 * MAX_OBJECTS].reshape(B, MAX_OBJECTS, 4)
        boxes = (inverse_sigmoid(encoded.clamp(0.01, 0.99))
                 + 0.1 * torch.tanh(self.box_head(feats)).view(B, Q, 4)).sigmoid()
        labels = images[:, 1, 0, :Q].round().long().clamp(0, NUM_CLASSES - 1)
        present = (torch.arange(Q, device=images.device)[None] < images[:, 2, 0, :1].round())  # (B, Q)
        prior = 4.0 * torch.nn.functional.one_hot(labels, NUM_CLASSES).float() * present[..., None] - 2.0
        logits = prior + self.class_head(feats).view(B, Q, NUM_CLASSES)
        return {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [],
                "interm_outputs": {"pred_logits": logits, "pred_boxes": boxes}, "dn_meta": None}


class FakeCriterion(nn.Module):
    """Query j <-> target j (no matching needed). `nan_image_ids` injects a NaN loss_bbox on
    any batch holding one of these images."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0}
        self.nan_image_ids: set[int] = set()

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        onehot = torch.zeros_like(logits)
        l1 = logits.new_zeros(())
        n = 0
        for b, t in enumerate(targets):
            k = len(t["labels"])
            onehot[b, torch.arange(k), t["labels"]] = 1.0
            l1 = l1 + (boxes[b, :k] - t["boxes"]).abs().sum()
            n += k
        loss_ce = nn.functional.binary_cross_entropy_with_logits(logits, onehot)
        loss_bbox = l1 / max(n, 1)
        if any(int(t["image_id"]) in self.nan_image_ids for t in targets):
            loss_bbox = loss_bbox * float("nan")
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_unweighted_extra": loss_ce.detach() * 0}


class FakePostProcess(nn.Module):
    """Top-k over flattened (query, class) sigmoid scores; xyxy in original pixels."""

    def __init__(self, num_select: int = 8) -> None:
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q, C = logits.shape
        scores, idx = logits.sigmoid().flatten(1).topk(min(self.num_select, Q * C), dim=1)
        q, labels = idx // C, idx % C
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        h_img, w_img = target_sizes.unbind(1)
        scale = torch.stack([w_img, h_img, w_img, h_img], 1)[:, None].to(xyxy)
        xyxy = torch.gather(xyxy, 1, q[..., None].expand(-1, -1, 4)) * scale
        return [{"scores": s, "labels": lab, "boxes": bx} for s, lab, bx in zip(scores, labels, xyxy)]


def build_fake_model(cfg) -> tuple[nn.Module, nn.Module, nn.Module]:  # noqa: ANN001
    torch.manual_seed(cfg.runtime.seed)
    return FakeDINO(), FakeCriterion(), FakePostProcess(cfg.eval.num_select)


def build_fake_data(cfg, n_train: int = 8, n_val: int = 7):  # noqa: ANN001, ANN201
    from datasets.collate import collate_detection
    from main import Data

    train = FakeDataset(n_train, seed=1, augment=True)
    val = FakeDataset(n_val, seed=2, augment=False)
    return Data(train=train, val=val, collate=collate_detection,
                label_to_category_id=FakeDataset.label_to_category_id, coco_gt=val.coco_gt(),
                class_names={0: "one", 1: "two"})


def run_fake(out_dir: str | Path, extra: list[str] | None = None) -> dict:
    """main.run on the fake model and data with fake_config(out_dir, extra)."""
    from main import parse_args, run

    return run(parse_args([]), fake_config(out_dir, extra), build_model_fn=build_fake_model,
               build_data_fn=build_fake_data)


def fake_config(out_dir: str | Path, extra: list[str] | None = None):  # noqa: ANN201
    from configs import Config, apply_overrides

    return apply_overrides(Config(name="fake"), [
        f"runtime.output_dir={out_dir}", "runtime.tensorboard=false", "data.num_workers=0",
        "optim.batch_size=2", "optim.epochs=2", "optim.lr=1e-2", "optim.lr_drop=1",
        "eval.num_select=8", "eval.max_dets=8", "eval.num_draw_images=2",
        "runtime.checkpoint_interval=0", *(extra or [])])


if __name__ == "__main__":
    import json

    from main import parse_args, run

    out = sys.argv[1]
    args = parse_args(sys.argv[2:])
    cfg = fake_config(out, args.opt)
    result = run(args, cfg, build_model_fn=build_fake_model, build_data_fn=build_fake_data)
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and result["metrics"] is not None:
        print("METRICS " + json.dumps({k: v for k, v in result["metrics"].items()
                                       if isinstance(v, (int, float))}))
