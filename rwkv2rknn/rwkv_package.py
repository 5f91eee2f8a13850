"""The `rwkv` package (the reference implementation), run in a child process.

The package picks its model class when ``rwkv.model`` is imported (RWKV-7 only with
``RWKV_V7_ON=1``), so one process cannot run RWKV-4 and RWKV-7 both, and a bench that has
already imported it for one version could not time another: each run is a fresh interpreter,
strategy 'cpu fp32', one token per call from the zero state. It returns the logits of every
token (the tests' reference) and the milliseconds each call took (the bench's figure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import List, Sequence, Tuple

import numpy as np

from rwkv2rknn.errors import MissingDependency, ToolkitError
from rwkv2rknn.io import scratch_prefix

_SCRIPT = r"""
import json, sys, time, numpy as np, torch
jobs, threads = json.load(open(sys.argv[1])), int(sys.argv[2])
if threads:
    torch.set_num_threads(threads)
from rwkv.model import RWKV
for job in jobs:
    pth = job["pth"]
    model = RWKV(model=pth[:-4] if pth.endswith(".pth") else pth, strategy="cpu fp32")
    state, rows, ms = None, [], []
    with torch.no_grad():
        for t in job["tokens"]:
            t0 = time.perf_counter()
            logits, state = model.forward([t], state)
            ms.append(1000.0 * (time.perf_counter() - t0))
            rows.append(logits.float().numpy())
    np.save(job["out"], np.stack(rows))
    with open(job["out"] + ".json", "w") as f:
        json.dump(ms, f)
"""


def available() -> bool:
    """The `rwkv` package is installed (it is imported only in the child)."""
    from rwkv2rknn.runtime.board import has_module
    return has_module("rwkv.model")


def package_env(version: str) -> dict:
    """The environment the package needs for ``version`` (no JIT, no CUDA; RWKV_V7_ON for 7).
    torch's OpenMP threads wait passively (unless set otherwise), as the executor's onnxruntime
    pools do: spinning threads on a busy machine made it 20x slower here (1256 against 71
    ms/token for a 0.19B RWKV-7 on 2 loaded cores)."""
    env = dict(os.environ, RWKV_JIT_ON="0", RWKV_CUDA_ON="0",
               RWKV_V7_ON="1" if str(version) == "7" else "0")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def package_run(pth: str, tokens: Sequence[int], version: str, threads: int = 1,
                timeout: float = 3600) -> Tuple[np.ndarray, List[float]]:
    """Teacher-forced logits [T, V] of the checkpoint ``pth`` from the `rwkv` package, and the
    wall time of each ``forward`` call in ms. ``threads``: torch's thread count (0: its default)."""
    return package_runs([(pth, tokens)], version, threads, timeout)[0]


def package_runs(jobs: Sequence[Tuple[str, Sequence[int]]], version: str, threads: int = 1,
                 timeout: float = 3600) -> List[Tuple[np.ndarray, List[float]]]:
    """``package_run`` for several (checkpoint, tokens) of one version, in one child process
    (it imports torch and the package once)."""
    if not available():
        raise MissingDependency("the rwkv package is not installed", "pip install rwkv")
    with tempfile.TemporaryDirectory(prefix=scratch_prefix("rwkvpkg")) as tmp:
        outs = [os.path.join(tmp, f"logits{i}.npy") for i in range(len(jobs))]
        spec = os.path.join(tmp, "jobs.json")
        with open(spec, "w") as f:
            json.dump([{"pth": pth, "tokens": [int(t) for t in tokens], "out": out}
                       for (pth, tokens), out in zip(jobs, outs)], f)
        r = subprocess.run([sys.executable, "-c", _SCRIPT, spec, str(int(threads))],
                           env=package_env(version), capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not all(os.path.exists(o) for o in outs):
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            names = ", ".join(f"'{os.path.basename(pth)}'" for pth, _ in jobs)
            raise ToolkitError(f"the rwkv package failed on {names} ({last[:200]})",
                               "check the checkpoint and the rwkv package install")
        results = []
        for out in outs:
            with open(out + ".json") as f:
                results.append((np.load(out), json.load(f)))
        return results
