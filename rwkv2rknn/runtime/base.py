"""The runner contract: every backend loads one segment and runs ``infer(feed) -> dict``."""

from __future__ import annotations

from typing import Dict, List, Protocol

import numpy as np


class Runner(Protocol):
    """One loaded segment. ``inputs``/``outputs`` are tensor names in the segment's order."""

    backend: str
    inputs: List[str]
    outputs: List[str]

    def infer(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run once; ``feed`` maps every input name to an array; returns every output by name."""
        ...

    def close(self) -> None:
        ...
