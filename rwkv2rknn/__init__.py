"""rwkv2rknn: compile RWKV language models into hybrid RKNN (NPU) + ONNX Runtime (CPU) programs."""

__version__ = "0.2.0"
