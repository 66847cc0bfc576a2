"""What the data path skipped or changed, per dataset: `data_report.json` and one log line each.

With `data.skip_bad_records=true` a bad record (missing or corrupt image, unknown image or
category id, malformed / negative-size / outside box) is skipped instead of stopping the run. The
counts alone would be easy to miss, so every run writes them, by reason and with the first few
offending records, into its directory and logs one line per dataset.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPORT_NAME = "data_report.json"
# Records left out of the dataset (counted only with skip_bad_records=true; an error otherwise).
SKIP_REASONS = ("missing_image_files", "corrupt_images_skipped", "skipped_unknown_image_id",
                "skipped_unknown_category", "skipped_malformed_bbox", "skipped_negative_size",
                "skipped_outside_image", "annotations_of_skipped_images")


def dataset_report(dataset: Any) -> dict[str, Any]:
    """Counts of one dataset: `skipped` (bad records, by reason), `examples` (the first offending
    records per reason) and `other_changes` (clipped boxes, crowd handling, augmentation drops).
    Datasets without counters (test fakes) give an empty report."""
    stats = getattr(dataset, "drop_stats", None)
    counts = stats.as_dict() if stats is not None else {}
    examples = {k: list(v) for k, v in getattr(dataset, "bad_examples", {}).items()}
    corrupt = getattr(dataset, "corrupt_image_examples", [])
    if corrupt:
        examples["corrupt_images_skipped"] = list(corrupt)
    skipped = {k: n for k, n in counts.items() if k in SKIP_REASONS}
    return {
        "source": getattr(dataset, "source", type(dataset).__name__),
        "images": len(dataset),
        "skip_bad_records": bool(getattr(dataset, "skip_bad_records", False)),
        "skipped": skipped,
        "examples": {k: examples[k] for k in sorted(examples) if k in skipped},
        "other_changes": {k: n for k, n in counts.items() if k not in SKIP_REASONS},
    }


def format_dataset_report(name: str, report: Mapping[str, Any]) -> str:
    """One line: the dataset, how many images it kept, and each skip reason with examples."""
    head = f"data {name} ({report['source']}): {report['images']} images"
    if not report["skipped"]:
        return head + "; nothing skipped"
    parts = []
    for reason, n in report["skipped"].items():
        shown = report["examples"].get(reason, [])
        parts.append(f"{reason}={n}" + (f" (first: {', '.join(shown)})" if shown else ""))
    total = sum(report["skipped"].values())
    return f"{head}; skipped {total} record(s) (data.skip_bad_records=true): " + "; ".join(parts)


def write_data_report(output_dir: str | Path, datasets: Mapping[str, Any], only_changes: bool = False
                      ) -> dict[str, Any]:
    """Write `output_dir/data_report.json` ({split: dataset_report}) atomically and log one line
    per dataset (a warning when records were skipped). `only_changes`: log only the datasets whose
    counts differ from the file already there (corrupt images are found while loading, so the
    report is refreshed after each evaluation). Returns the report."""
    import json

    from util.logging import write_json_atomic

    report = {name: dataset_report(ds) for name, ds in datasets.items() if ds is not None}  # no train set with --eval
    path = Path(output_dir) / REPORT_NAME
    previous: dict = {}
    if only_changes and path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    for name, rep in report.items():
        if only_changes and previous.get(name) == rep:
            continue
        (log.warning if rep["skipped"] else log.info)("%s; see %s", format_dataset_report(name, rep), path)
    return report
