"""The runner contract: every backend loads one segment and runs ``infer(feed) -> dict``."""

from __future__ import annotations

from typing import Dict, List, Protocol

import numpy as np

from rwkv2rknn.errors import MissingDependency

RUNNERS = "rwkv2rknn.runners"  # entry point group: runners of the compile side (rknn-sim)


class Runner(Protocol):
    """One loaded segment. ``inputs``/``outputs`` are tensor names in the segment's order."""

    backend: str
    inputs: List[str]
    outputs: List[str]

    def infer(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run once; ``feed`` maps every input name to an array; returns every output by name."""
        ...

    def close(self) -> None: ...


def plugin_runner(backend: str):
    """The runner class of a compile-side backend (``rknn-sim``: it builds with rknn-toolkit2),
    found by the package's entry points: the runtime imports nothing of the compile side."""
    from importlib.metadata import entry_points

    eps = entry_points()
    for ep in eps.select(group=RUNNERS) if hasattr(eps, "select") else eps.get(RUNNERS, ()):  # 3.9
        if ep.name == backend:
            return ep.load()
    raise MissingDependency(
        f"the {backend} runner is not registered (the package's entry points are missing or out of date)",
        "install rwkv2rknn again: make install",
    )
