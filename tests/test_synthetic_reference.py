"""The synthetic renderer against a frozen reference: images (SHA-256 of the uint8 pixels),
annotations, ignored regions and generator statistics, for the demo's, the dense config's and
the default settings at 112, 128 and 256 px (and one non-square size). The renderer may be made
faster, but a training run must see the same data for the same seed, so the output has to stay
bit-identical. `python -m tests.test_synthetic_reference --write` rewrites the fixture; only do
that when the scenes are meant to change."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from datasets.synthetic import generate_synthetic

FIXTURE = Path(__file__).parent / "fixtures" / "synthetic_reference.json"

# name -> generate_synthetic keyword arguments
CASES: dict[str, dict] = {
    "demo_112_seed0": dict(num_images=6, image_size=(112, 112), min_objects=5, max_objects=25, seed=0),
    "demo_112_seed1": dict(num_images=6, image_size=(112, 112), min_objects=5, max_objects=25, seed=1),
    "dense_128_seed0": dict(num_images=5, image_size=(128, 128), min_objects=30, max_objects=90, seed=0,
                            max_ignored_regions=3, small_side=(3.0, 7.0, 16.0), clutter=24),
    "dense_128_seed5": dict(num_images=5, image_size=(128, 128), min_objects=30, max_objects=90, seed=5,
                            max_ignored_regions=3, small_side=(3.0, 7.0, 16.0), clutter=24),
    "default_256_seed0": dict(num_images=3, image_size=(256, 256), seed=0),
    "clutter_256_seed2": dict(num_images=2, image_size=(256, 256), seed=2, clutter=40),
    "nonsquare_96x160_seed3": dict(num_images=3, image_size=(96, 160), min_objects=10, max_objects=60,
                                   seed=3, max_ignored_regions=1, clutter=8),
}


def summarise(kwargs: dict) -> dict:
    """What generate_synthetic returns, in JSON: the COCO dict, a hash per image, the stats."""
    coco, images, stats = generate_synthetic(**kwargs)
    hashes = {str(image_id): [list(img.shape), str(img.dtype), hashlib.sha256(img.numpy().tobytes()).hexdigest()]
              for image_id, img in images.items()}
    return {"coco": coco, "image_sha256": hashes, "stats": dict(sorted(stats.items()))}


def _as_json(value):
    return json.loads(json.dumps(value))     # tuples -> lists, int keys -> str, as the fixture holds


@pytest.mark.parametrize("name", sorted(CASES))
def test_synthetic_matches_frozen_reference(name: str) -> None:
    reference = json.loads(FIXTURE.read_text())[name]
    got = _as_json(summarise(CASES[name]))
    assert got["image_sha256"] == reference["image_sha256"], f"{name}: pixels differ from the reference"
    assert got["coco"] == reference["coco"], f"{name}: annotations differ from the reference"
    assert got["stats"] == reference["stats"], f"{name}: generator statistics differ from the reference"


def test_reference_covers_every_feature() -> None:
    """The fixture exercises crowds, all classes, small/medium/large boxes, occluded objects and
    rejected placements, so a renderer change in any of them shows."""
    reference = json.loads(FIXTURE.read_text())
    anns = [a for case in reference.values() for a in case["coco"]["annotations"]]
    assert any(a["iscrowd"] for a in anns)
    assert {a["category_id"] for a in anns if not a["iscrowd"]} == set(range(1, 8))
    areas = [a["area"] for a in anns if not a["iscrowd"]]
    assert min(areas) < 32 ** 2 and any(32 ** 2 <= x < 96 ** 2 for x in areas) and max(areas) >= 96 ** 2
    assert any(a["visibility"] < 1.0 for a in anns if not a["iscrowd"])
    assert all(case["stats"]["placements_rejected_overlap"] > 0 for case in reference.values())


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    FIXTURE.write_text(json.dumps({name: summarise(kwargs) for name, kwargs in CASES.items()},
                                  sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {FIXTURE}")
