import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
sys.path.insert(0, os.path.dirname(__file__))  # tests/public_recipe.py

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


# A small random RWKV-7: 3 layers, width 192 (3 heads of 64), odd vocabulary, LoRA widths
# that are not powers of two (the checkpoint maker's defaults: w 40, a 36, v 20, g 56).
SMALL7 = dict(layers=3, width=192, vocab=301, seed=5)


@pytest.fixture(scope="session")
def v7_sd():
    from rwkv2rknn.models.checkpoint import random_rwkv7
    return random_rwkv7(**SMALL7)


@pytest.fixture(scope="session")
def v7_dirs(v7_sd, tmp_path_factory):
    """{'pth', 'fp32', 'fp16'}: the checkpoint as an official .pth and its two exports."""
    from rwkv2rknn.models.checkpoint import save_checkpoint
    from rwkv2rknn.models.export import export
    d = tmp_path_factory.mktemp("v7")
    out = {"pth": str(d / "rwkv7.pth"), "fp32": str(d / "fp32"), "fp16": str(d / "fp16")}
    save_checkpoint(v7_sd, out["pth"])
    export(v7_sd, out["fp32"], fp32=True, tokenizer="bytes")
    export(v7_sd, out["fp16"], tokenizer="bytes")
    return out


@pytest.fixture(scope="session")
def v7_tokens():
    return [int(t) for t in np.random.default_rng(17).integers(0, SMALL7["vocab"], 40)]


@pytest.fixture(scope="session")
def v7_reference(v7_dirs, v7_tokens, tmp_path_factory):
    """The `rwkv` package's logits [40, V] for v7_tokens (cpu fp32, in a child process)."""
    from rwkv_package import package_logits
    return package_logits(v7_dirs["pth"], v7_tokens, "7", str(tmp_path_factory.mktemp("pkg7")))


@pytest.fixture(scope="session")
def v7_plan_artifact(v7_dirs, tmp_path_factory):
    """The fp32 RWKV-7 files compiled plan-only (every segment runs on onnxruntime)."""
    from rwkv2rknn.compiler import compile_model
    from rwkv2rknn.ir import Options
    out = str(tmp_path_factory.mktemp("art7") / "fp32")
    compile_model(v7_dirs["fp32"], out, Options(plan_only=True))
    return out


@pytest.fixture(scope="session")
def v7_rknn_artifact(v7_dirs, tmp_path_factory):
    """The fp16 RWKV-7 files compiled with the real rknn-toolkit2 (per-token and T-row builds)."""
    from rwkv2rknn.compiler import compile_model
    from rwkv2rknn.ir import Options
    out = str(tmp_path_factory.mktemp("art7") / "fp16")
    compile_model(v7_dirs["fp16"], out, Options(prefill_rows=(16, 32)))
    return out
