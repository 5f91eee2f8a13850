import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
sys.path.insert(0, os.path.dirname(__file__))  # tests/public_recipe.py
# training/rwkv4_torch.py and train.py (the training script lives outside the installed package)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training"))

# A small random RWKV-4: width not a power of two, odd vocabulary.
SMALL = dict(layers=3, width=48, vocab=97, seed=1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Every test session builds into its own cache, never the user's."""
    old = os.environ.get("RWKV2RKNN_CACHE")
    os.environ["RWKV2RKNN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("RWKV2RKNN_CACHE", None)
    else:
        os.environ["RWKV2RKNN_CACHE"] = old


@pytest.fixture(scope="session")
def small_sd():
    from rwkv2rknn.models.checkpoint import random_checkpoint
    return random_checkpoint(**SMALL)


@pytest.fixture(scope="session")
def small_pth(small_sd, tmp_path_factory):
    from rwkv2rknn.models.checkpoint import save_checkpoint
    path = str(tmp_path_factory.mktemp("ckpt") / "small.pth")
    save_checkpoint(small_sd, path)
    return path


@pytest.fixture(scope="session")
def fp32_dir(small_sd, tmp_path_factory):
    from rwkv2rknn.models.export import export
    d = str(tmp_path_factory.mktemp("onnx") / "fp32")
    export(small_sd, d, fp32=True, tokenizer="bytes")
    return d


@pytest.fixture(scope="session")
def fp16_dir(small_sd, tmp_path_factory):
    from rwkv2rknn.models.export import export
    d = str(tmp_path_factory.mktemp("onnx") / "fp16")
    export(small_sd, d, fp32=False, tokenizer="bytes")
    return d


@pytest.fixture(scope="session")
def fp16_artifact(fp16_dir, tmp_path_factory):
    """fp16 files compiled with the real rknn-toolkit2 (NPU segments built to .rknn)."""
    from rwkv2rknn.compiler import compile_model
    from rwkv2rknn.ir import Options
    out = str(tmp_path_factory.mktemp("art") / "fp16")
    compile_model(fp16_dir, out, Options())
    return out


@pytest.fixture(scope="session")
def fp32_plan_artifact(fp32_dir, tmp_path_factory):
    from rwkv2rknn.compiler import compile_model
    from rwkv2rknn.ir import Options
    out = str(tmp_path_factory.mktemp("art") / "fp32")
    compile_model(fp32_dir, out, Options(plan_only=True))
    return out


@pytest.fixture(scope="session")
def tokens():
    return [int(t) for t in np.random.default_rng(7).integers(0, SMALL["vocab"], 40)]
