"""The rwkv2rknn command line (``rwkv2rknn`` and ``python -m rwkv2rknn``)."""

from rwkv2rknn.cli.app import cli, main
from rwkv2rknn.cli import board, chatting, compiling, measuring, reporting, running  # noqa: F401  (they add the commands)

__all__ = ["cli", "main"]
