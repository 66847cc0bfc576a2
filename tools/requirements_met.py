"""Exit 0 when every requirement of the given files is installed at an allowed version, else 1.

    python tools/requirements_met.py requirements.txt -c constraints-torch.txt

The run scripts ask this before `pip install`: pip's resolver takes several seconds even when
nothing needs installing, which the demo's measured time would include. It understands what our
requirement files use (names with version specifiers and markers, `-r other.txt`, comments);
anything it cannot read counts as unmet, so pip runs and decides.
"""
from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path


def read_requirements(path: Path) -> list[str]:
    """Requirement lines of `path`, following `-r` includes relative to it."""
    lines: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            lines += read_requirements(path.parent / line.split(None, 1)[1])
        else:
            lines.append(line)
    return lines


def unmet(requirements: list[str], constraints: list[str]) -> list[str]:
    """The requirements (constraints applied to the same names) the environment does not satisfy."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for text in constraints:
        req = Requirement(text)
        pins[canonicalize_name(req.name)] = req.specifier
    missing = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{text} (not installed)")
            continue
        allowed = req.specifier & pins.get(canonicalize_name(req.name), req.specifier)
        if not allowed.contains(installed, prereleases=True):
            missing.append(f"{text} (installed {installed}, allowed {allowed})")
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="requirement files")
    p.add_argument("-c", "--constraints", type=Path, action="append", default=[],
                   help="constraint files (pins for names the requirements list)")
    args = p.parse_args(argv)
    try:
        missing = unmet([r for f in args.files for r in read_requirements(f)],
                        [r for f in args.constraints for r in read_requirements(f)])
    except Exception as err:  # noqa: BLE001 -- unreadable here means "let pip decide"
        print(f"requirements_met: cannot tell ({type(err).__name__}: {err}); pip will check", file=sys.stderr)
        return 1
    for line in missing:
        print(f"requirements_met: unmet: {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
