"""Official DINO checkpoint (.pth) -> our config.json + model.safetensors, with an import report.

    python tools/import_official.py checkpoint0011_5scale.pth out/dino_r50
    python tools/import_official.py ckpt.pth out/ --official-config config.json   # ckpt without "args"
    python tools/import_official.py ckpt.pth out/ --config dino_5scale_r50_coco
    # fine-tune start: other class count and/or UGS box heads, through config overrides
    python tools/import_official.py ckpt.pth out/ --opt model.num_classes=10 model.dn_labelbook_size=10

The checkpoint is read with weights_only=True (argparse.Namespace allow-listed). The config comes
from the checkpoint's "args" when present (configs.from_official_args), else from
--official-config (a JSON dict of official arguments) or --config (one of ours); --opt overrides
apply last. The model built from that config receives the weights (util.checkpoint.import_weights:
class-dependent tensors re-initialised when the class count differs, UGS heads zero-initialised,
any other mismatch an error unless --skip-mismatched), and its full state dict is written in the
official key layout. Exit status 1 with --strict when tensors were missing, unexpected or skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import ConfigError, apply_overrides, dump_config, from_official_args, load_config  # noqa: E402
from util.checkpoint import (CheckpointError, export_safetensors, extract_state_dict, import_weights,  # noqa: E402
                             load_checkpoint)
from util.cli import add_debug_option, entry_point  # noqa: E402
from util.run_start import without_replaced_download  # noqa: E402
from util.weight_downloads import explain_download_failure  # noqa: E402


def detector_state_dict(checkpoint: dict, path: str) -> dict:
    """The DINO state dict of an official checkpoint (`{'model': ...}`, `module.` stripped).

    An ImageNet backbone checkpoint (Swin's `{'model': {'patch_embed.*', 'layers.*', 'head.*'}}`) is
    not a detector: it is refused with the way to use it (`model.backbone_weights`)."""
    state_dict = extract_state_dict(checkpoint)
    if not any(k.startswith("backbone.") for k in state_dict) and \
            any(k.startswith(("patch_embed.", "head.")) for k in state_dict):
        raise CheckpointError(f"{path} is an ImageNet backbone checkpoint, not a DINO one; train from it "
                              f"with --opt model.backbone_weights={path} (Swin backbones, loaded into "
                              "the backbone alone)")
    return state_dict


def resolve_config(checkpoint: dict, official_config: str | None, config: str | None,  # noqa: ANN201
                   overrides: list[str]):
    """Our Config for this checkpoint (see module docstring for the precedence)."""
    if official_config and config:
        raise ConfigError("pass either --official-config or --config, not both")
    if official_config:
        path = Path(official_config)
        if not path.is_file():
            raise ConfigError(f"official config {path} does not exist")
        cfg, source = from_official_args(json.loads(path.read_text())), str(path)
    elif config:
        cfg, source = load_config(config), f"config {config}"
    elif "args" in checkpoint:
        cfg, source = from_official_args(checkpoint["args"]), "the checkpoint's args"
    else:
        raise ConfigError("the checkpoint has no 'args' (official training arguments); pass "
                          "--official-config CONFIG.json or --config NAME")
    return apply_overrides(cfg, overrides), source


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="official DINO checkpoint (.pth)")
    parser.add_argument("out_dir", help="directory for config.json and model.safetensors")
    parser.add_argument("--official-config", help="JSON dict of official DINO arguments")
    parser.add_argument("--config", help="one of our configs (name or path) instead of the official args")
    parser.add_argument("--opt", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides")
    parser.add_argument("--skip-mismatched", action="store_true",
                        help="keep the fresh initialisation for tensors whose shape differs (reported)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when tensors were missing, unexpected or skipped")
    add_debug_option(parser)
    args = parser.parse_args(argv)

    from models import build_model  # heavy import after argument parsing

    # errors (unreadable checkpoint, config, shapes) become one message and exit status 2: @entry_point
    checkpoint = load_checkpoint(args.checkpoint)
    cfg, source = resolve_config(checkpoint, args.official_config, args.config, args.opt)
    state_dict = detector_state_dict(checkpoint, args.checkpoint)
    build_cfg = without_replaced_download(cfg, state_dict, args.checkpoint)
    with explain_download_failure(build_cfg.model.backbone, build_cfg.model.backbone_weights):
        model, _, _ = build_model(build_cfg)
    report = import_weights(model, state_dict, skip_mismatched=args.skip_mismatched)

    out_dir = Path(args.out_dir)
    config_path = dump_config(cfg, out_dir / "config.json")
    weights_path = export_safetensors(model.state_dict(), out_dir / "model.safetensors",
                                      metadata={"source": Path(args.checkpoint).name, "config": cfg.name,
                                                "layout": "official-dino"})
    tmp = out_dir / ".import_report.txt.tmp"
    tmp.write_text(str(report) + "\n")
    tmp.replace(out_dir / "import_report.txt")
    print(f"config from {source}")
    print(report)
    print(f"wrote {config_path} and {weights_path} ({len(model.state_dict())} tensors)")
    if args.strict and (report.missing or report.unexpected or report.skipped_mismatch):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
