"""Convert a VisDrone-DET split into COCO JSON.

    python tools/convert_visdrone.py data/VisDrone2019-DET-train data/visdrone_train.json

ROOT holds images/*.jpg and annotations/*.txt. Ignored regions (category 0) and "others"
(category 11) become crowd annotations, one per evaluated category, so COCO-style evaluation
ignores detections inside them for every class; --drop-ignored drops them instead. Boxes are
clipped to the image (size read from the file), zero-area boxes dropped; truncation and occlusion
are kept as extra fields. A summary of every clip, drop and skip is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.visdrone import VisDroneFormatError, convert_split, format_summary  # noqa: E402
from util.cli import add_debug_option, entry_point  # noqa: E402


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="VisDrone-DET split folder (images/, annotations/)")
    parser.add_argument("out", type=Path, help="output COCO JSON")
    parser.add_argument("--drop-ignored", action="store_true",
                        help="drop ignored regions and 'others' instead of emitting crowd annotations")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count malformed annotation lines instead of failing")
    parser.add_argument("--allow-missing", action="store_true",
                        help="convert images that have no annotation file (no annotations; counted)")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    try:
        coco, stats = convert_split(args.root, drop_ignored=args.drop_ignored,
                                    skip_bad_lines=args.skip_bad_lines, allow_missing=args.allow_missing,
                                    progress=sys.stderr.isatty())
    except VisDroneFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(args.out)
    crowd = sum(1 for a in coco["annotations"] if a["iscrowd"])
    print(f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations']) - crowd} objects, "
          f"{crowd} crowd annotations ({crowd // 10 if crowd else 0} ignored regions x 10 categories)")
    print("summary (every clip, drop and skip):")
    print(format_summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
