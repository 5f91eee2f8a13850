"""The `rwkv` package (the reference implementation), run in a child process.

The package picks its model class when ``rwkv.model`` is imported (RWKV-7 only with
``RWKV_V7_ON=1``), so one process cannot run RWKV-4 and RWKV-7 both, and a bench that has
already imported it for one version could not time another: each run is a fresh interpreter,
strategy 'cpu fp32', one token per call from the zero state. It returns the logits of every
token (the tests' reference) and the milliseconds each call took (the bench's figure). A
``PackageProcess`` keeps one such interpreter for several requests of versions that share its
environment (4, 5.2 and 6; or 7): torch and the package are imported once.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from typing import List, Sequence, Tuple

import numpy as np

from rwkv2rknn.errors import MissingDependency, ToolkitError
from rwkv2rknn.fileio import end_kept_child, scratch_prefix

_SCRIPT = r"""
import json, os, sys, time, traceback, numpy as np, torch
reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # what the package prints never reaches the reply channel
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
from rwkv.model import RWKV
kept = {}
for line in sys.stdin:
    try:
        for job in json.loads(line):
            pth = job["pth"]
            if job.get("keep") and pth in kept:
                model, state = kept[pth]
            else:
                model = RWKV(model=pth[:-4] if pth.endswith(".pth") else pth, strategy="cpu fp32")
                state = None
            rows, ms = [], []
            with torch.no_grad():
                for t in job["tokens"]:
                    t0 = time.perf_counter()
                    logits, state = model.forward([t], state)
                    ms.append(1000.0 * (time.perf_counter() - t0))
                    rows.append(logits.float().numpy())
            if job.get("keep"):
                kept[pth] = (model, state)
            np.save(job["out"], np.stack(rows))
            with open(job["out"] + ".json", "w") as f:
                json.dump(ms, f)
        reply.write("\n")
    except Exception as e:  # the request fails, the process goes on
        last = (traceback.format_exc().strip().splitlines() or [repr(e)])[-1]
        reply.write(json.dumps(last) + "\n")
    reply.flush()
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
    env = dict(os.environ, RWKV_JIT_ON="0", RWKV_CUDA_ON="0", RWKV_V7_ON="1" if str(version) == "7" else "0")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def package_run(
    pth: str, tokens: Sequence[int], version: str, threads: int = 1, timeout: float = 3600
) -> Tuple[np.ndarray, List[float]]:
    """Teacher-forced logits [T, V] of the checkpoint ``pth`` from the `rwkv` package, and the
    wall time of each ``forward`` call in ms. ``threads``: torch's thread count (0: its default)."""
    return package_runs([(pth, tokens)], version, threads, timeout)[0]


def package_runs(
    jobs: Sequence[Tuple[str, Sequence[int]]], version: str, threads: int = 1, timeout: float = 3600
) -> List[Tuple[np.ndarray, List[float]]]:
    """``package_run`` for several (checkpoint, tokens) of one version, in one new child."""
    proc = PackageProcess(version, threads)
    try:
        return proc.run(jobs, timeout)
    finally:
        proc.close()


class PackageProcess:
    """One child interpreter running the package, kept for several ``run`` calls of versions
    with its environment (``same_env``)."""

    def __init__(self, version: str, threads: int = 1):
        if not available():
            raise MissingDependency("the rwkv package is not installed", "pip install rwkv")
        self.version, self.count = str(version), 0
        self.folder = tempfile.mkdtemp(prefix=scratch_prefix("rwkvpkg"))
        try:
            self.stderr = open(os.path.join(self.folder, "stderr.txt"), "w+")
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SCRIPT, str(int(threads))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                text=True,
                env=package_env(version),
            )
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def same_env(self, version: str) -> bool:
        return package_env(version) == package_env(self.version)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(
        self, jobs: Sequence[Tuple[str, Sequence[int]]], timeout: float = 3600, keep: bool = False
    ) -> List[Tuple[np.ndarray, List[float]]]:
        """(logits [T, V], ms per call) of each (checkpoint, tokens); a ToolkitError naming the
        checkpoints and the package's last line if it fails. ``keep``: the child keeps each
        checkpoint's model and state after the request, and a later ``keep`` request of the
        same checkpoint goes on from that state (the bench's rounds); else every request
        loads the model and starts from the zero state."""
        outs = [os.path.join(self.folder, f"logits{self.count + i}.npy") for i in range(len(jobs))]
        self.count += len(jobs)
        names = ", ".join(f"'{os.path.basename(pth)}'" for pth, _ in jobs)
        request = [
            {"pth": pth, "tokens": [int(t) for t in tokens], "out": out, "keep": bool(keep)}
            for (pth, tokens), out in zip(jobs, outs)
        ]
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            line = self.proc.stdout.readline() if ready else None
        except BrokenPipeError:
            line = ""
        if line is None:
            self.close()
            why = f"took longer than {timeout:g} s"
        elif line.strip():
            why = json.loads(line)
        elif line == "":  # the process ended
            why = self._last_said()
        else:
            why = ""
        try:
            if why or not all(os.path.exists(o) for o in outs):
                raise ToolkitError(
                    f"the rwkv package failed on {names} ({(why or 'no output')[:200]})",
                    "check the checkpoint and the rwkv package install",
                )
            results = []
            for out in outs:
                with open(out + ".json") as f:
                    results.append((np.load(out), json.load(f)))
            return results
        finally:
            for out in outs:
                for path in (out, out + ".json"):
                    if os.path.exists(path):
                        os.unlink(path)

    def _last_said(self) -> str:
        try:
            self.stderr.seek(0)
            lines = [ln for ln in self.stderr.read().splitlines() if ln.strip()]
        except (OSError, ValueError):
            lines = []
        return lines[-1].strip() if lines else "the process ended"

    def close(self) -> None:
        end_kept_child(self.proc, self.stderr, self.folder, timeout=10)
