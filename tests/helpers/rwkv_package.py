"""Logits from the `rwkv` package (the reference implementation), computed in a child process
(rwkv2rknn/tools/rwkv_package.py). The package picks its model class at import, so RWKV-7 needs an
interpreter of its own: one child for RWKV-7 and one for RWKV-4, 5.2 and 6, each kept for the
test session (torch and the package are imported once, not per reference)."""

import atexit

import numpy as np

from rwkv2rknn.tools.rwkv_package import PackageProcess

_kept = []


def _child(version: str) -> PackageProcess:
    for p in list(_kept):
        if p.same_env(version):
            if p.alive:
                return p
            p.close()
            _kept.remove(p)
    p = PackageProcess(version, threads=1)
    _kept.append(p)
    return p


@atexit.register
def _close():
    for p in _kept:
        p.close()


def package_logits(pth: str, tokens, version: str, tmp_dir: str = "") -> np.ndarray:
    """Teacher-forced logits [T, V] of the checkpoint ``pth`` from the `rwkv` package."""
    return package_logits_each([(pth, tokens)], version)[0]


def package_logits_each(jobs, version: str) -> list:
    """``package_logits`` of several (checkpoint, tokens) of one version."""
    return [logits for logits, _ in _child(str(version)).run(jobs, timeout=600)]
