"""Logits from the `rwkv` package (the reference implementation), computed in a child process
(rwkv2rknn/rwkv_package.py: one fresh interpreter per run, so RWKV-4 and RWKV-7 both work)."""

import numpy as np

from rwkv2rknn.rwkv_package import package_run


def package_logits(pth: str, tokens, version: str, tmp_dir: str = "") -> np.ndarray:
    """Teacher-forced logits [T, V] of the checkpoint ``pth`` from the `rwkv` package."""
    return package_run(pth, tokens, version, threads=1, timeout=600)[0]
