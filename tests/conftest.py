import functools
import os
import sys

import numpy as np
import pytest

from rwkv2rknn.tools.check import KL_TOLERANCE

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers/ (helpers.NAME), tests/fixtures/
# A test module another folder imports by name: tests/rknn/test_columns.py (test_slot_onefile.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "rknn"))
# The robustness corpus's helpers and its shared models, compiled once a session.
pytest_plugins = ["helpers.robustness"]
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
def standin_lib(tmp_path_factory):
    """build(version='2.5.0') -> path of the RECORDING STAND-IN librknnrt.so
    (tests/runtime/standin_librknnrt.c) compiled with gcc, carrying that version string."""
    import shutil
    import subprocess

    made = {}

    def build(version="2.5.0"):
        if version not in made:
            if not shutil.which("gcc"):
                pytest.fail("gcc is needed to build the stand-in librknnrt (apt-get install gcc)")
            out = str(tmp_path_factory.mktemp("standin") / "libstandin_rknnrt.so")
            src = os.path.join(os.path.dirname(__file__), "runtime", "standin_librknnrt.c")
            subprocess.run(
                [
                    "gcc",
                    "-shared",
                    "-fPIC",
                    "-O1",
                    "-Wall",
                    "-Werror",
                    f'-DSTANDIN_VERSION="{version}"',
                    "-o",
                    out,
                    src,
                ],
                check=True,
            )
            made[version] = out
        return made[version]

    return build


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
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    out = str(tmp_path_factory.mktemp("art") / "fp16")
    compile_model(fp16_dir, out, Options())
    return out


@pytest.fixture(scope="session")
def fp32_plan_artifact(fp32_dir, tmp_path_factory):
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    out = str(tmp_path_factory.mktemp("art") / "fp32")
    compile_model(fp32_dir, out, Options(plan_only=True))
    return out


# check's KL gate for fp16 NPU builds, as compare_logits keywords (tests comparing logits directly)
FP16_KL = dict(zip(("max_kl_mean", "max_kl_p99"), KL_TOLERANCE["fp16"]))

# The w8a8 compile of byte_model (tests/test_quant.py, tests/test_check_kl.py).
W8A8_OPTIONS = dict(quant="w8a8", calib_tokens=96, prefill_rows=(4, 8))


@pytest.fixture(scope="session")
def byte_model(tmp_path_factory):
    """A small random byte-level RWKV-4 as fp32 files (vocabulary 256, so text reads as its tokens)."""
    from helpers import random_model

    return random_model(tmp_path_factory, "bytes", fp32=True, layers=2, width=64, vocab=256, seed=5)


@pytest.fixture(scope="session")
def w8a8_artifact(byte_model, tmp_path_factory):
    """byte_model compiled --quant w8a8 (rknn-toolkit2 builds, calibrated on the bundled held-out text)."""
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    out = str(tmp_path_factory.mktemp("art") / "w8a8")
    compile_model(byte_model, out, Options(**W8A8_OPTIONS))
    return out


@pytest.fixture(scope="session")
def tokens():
    return [int(t) for t in np.random.default_rng(7).integers(0, SMALL["vocab"], 40)]


# Small random RWKV-5.2, 6 and 7 models: 3 layers, width 192 or 128 (heads of 64), odd vocabularies,
# LoRA widths that are not powers of two (the checkpoint makers' defaults: RWKV-7 w 40, a 36,
# v 20, g 56; RWKV-6 maa 20, decay 44). Each is built once per session, on first use.
SLOT_MODELS = {
    "7": dict(layers=3, width=192, vocab=301, seed=5),
    "6": dict(layers=3, width=192, vocab=263, seed=6),
    "5": dict(layers=3, width=128, vocab=211, seed=7),
}


class SlotModel:
    """One small model of a named-slot version, its exports, the `rwkv` package's logits for 40
    seeded tokens (cpu fp32, in a child process) and its compiled artifacts."""

    def __init__(self, version, tmp_path_factory):
        self.version, self._tmp = version, tmp_path_factory
        self.shape = SLOT_MODELS[version]
        self.tokens = [int(t) for t in np.random.default_rng(17).integers(0, self.shape["vocab"], 40)]

    @functools.cached_property
    def sd(self):
        from rwkv2rknn.models import checkpoint

        make = {"5": checkpoint.random_rwkv5, "6": checkpoint.random_rwkv6, "7": checkpoint.random_rwkv7}[
            self.version
        ]
        return make(**self.shape)

    @functools.cached_property
    def dirs(self):
        """{'pth', 'fp32', 'fp16'}: the checkpoint as an official .pth and its two exports."""
        from rwkv2rknn.models.checkpoint import save_checkpoint
        from rwkv2rknn.models.export import export

        d = self._tmp.mktemp(f"v{self.version}")
        out = {"pth": str(d / "model.pth"), "fp32": str(d / "fp32"), "fp16": str(d / "fp16")}
        save_checkpoint(self.sd, out["pth"])
        export(self.sd, out["fp32"], fp32=True, tokenizer="bytes")
        export(self.sd, out["fp16"], tokenizer="bytes")
        return out

    @functools.cached_property
    def reference(self):
        from helpers.rwkv_package import package_logits

        return package_logits(
            self.dirs["pth"], self.tokens, self.version, str(self._tmp.mktemp(f"pkg{self.version}"))
        )

    @functools.cached_property
    def plan_artifact(self):
        """The fp32 files compiled plan-only (every segment runs on onnxruntime)."""
        return self._compile("fp32", plan_only=True)

    @functools.cached_property
    def rknn_artifact(self):
        """The fp16 files compiled with the real rknn-toolkit2 (per-token and T-row builds)."""
        return self._compile("fp16", prefill_rows=(16,))

    def _compile(self, dtype, **options):
        from rwkv2rknn.compiler.driver import compile_model
        from rwkv2rknn.compiler.ir import Options

        out = str(self._tmp.mktemp(f"art{self.version}") / dtype)
        compile_model(self.dirs[dtype], out, Options(**options))
        return out


@pytest.fixture(scope="session")
def slot_models(tmp_path_factory):
    """version -> SlotModel ('5', '6' or '7'), made once per session."""
    made = {}
    return lambda version: made.setdefault(version, SlotModel(version, tmp_path_factory))


@pytest.fixture(scope="session")
def bundled_artifact():
    """The bundled model as a user's first `rwkv2rknn run` compiles it (into this session's cache)."""
    from rwkv2rknn.compiler.bundled import ensure_compiled

    return ensure_compiled()
