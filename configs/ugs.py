"""UGS section of the config (ugs_method.md): grid, losses, uncertainty-guided refinement."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UGSConfig:
    enabled: bool = False
    # TODO(ugs): filled in by the UGS issue.
