"""Logits from the `rwkv` package (the reference implementation), computed in a child process.

The package picks its model class when ``rwkv.model`` is imported (RWKV-7 only with
``RWKV_V7_ON=1``), so one process cannot run RWKV-4 and RWKV-7 both: each reference runs in its
own interpreter, strategy 'cpu fp32', one token per call from the zero state.
"""

import os
import subprocess
import sys

import numpy as np

_SCRIPT = r"""
import sys, numpy as np, torch
torch.set_num_threads(1)
from rwkv.model import RWKV
pth, tokens, out = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
model = RWKV(model=pth[:-4] if pth.endswith(".pth") else pth, strategy="cpu fp32")
state, rows = None, []
for t in tokens:
    logits, state = model.forward([t], state)
    rows.append(logits.float().numpy())
np.save(out, np.stack(rows))
"""


def package_logits(pth: str, tokens, version: str, tmp_dir: str) -> np.ndarray:
    """Teacher-forced logits [T, V] of the checkpoint ``pth`` from the `rwkv` package."""
    env = dict(os.environ, RWKV_JIT_ON="0", RWKV_CUDA_ON="0", RWKV_V7_ON="1" if version == "7" else "0")
    out = os.path.join(tmp_dir, "package_logits.npy")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, pth, ",".join(str(int(t)) for t in tokens), out],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(out)
