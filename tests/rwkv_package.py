"""Logits from the `rwkv` package (the reference implementation), computed in a child process
(rwkv2rknn/rwkv_package.py: one fresh interpreter per run, so RWKV-4 and RWKV-7 both work)."""

import numpy as np

from rwkv2rknn.rwkv_package import package_runs


def package_logits(pth: str, tokens, version: str, tmp_dir: str = "") -> np.ndarray:
    """Teacher-forced logits [T, V] of the checkpoint ``pth`` from the `rwkv` package."""
    return package_logits_each([(pth, tokens)], version)[0]


def package_logits_each(jobs, version: str) -> list:
    """``package_logits`` of several (checkpoint, tokens) of one version, in one child."""
    return [logits for logits, _ in package_runs(jobs, version, threads=1, timeout=600)]
