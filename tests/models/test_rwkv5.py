"""RWKV-5.2: checkpoint reading, the per-layer export, and parity with the `rwkv` package."""

import numpy as np
import pytest

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.models import rwkv5
from rwkv2rknn.models.checkpoint import random_rwkv5
from rwkv2rknn.models.export import arch_of


def test_shape_is_read_from_the_tensors(slot_models):
    sd = slot_models("5").sd
    shape = rwkv5.check_state_dict(sd)
    assert (shape.layers, shape.width, shape.ffn, shape.vocab) == (3, 128, 448, 211)
    assert (shape.heads, shape.head_size) == (2, 64)
    assert shape.params() == sum(a.size for a in sd.values())
    assert arch_of(sd)[0] is rwkv5


def test_rwkv5_0_decay_is_refused():
    """RWKV-5.0/5.1 keep one decay per head: not the 5.2 this module knows."""
    sd = random_rwkv5(layers=2, width=128, vocab=50, seed=3)
    for i in range(2):
        sd[f"blocks.{i}.att.time_decay"] = np.zeros((2, 1), np.float32)
    with pytest.raises(UnsupportedModel, match="not an RWKV-5.2 checkpoint"):
        rwkv5.check_state_dict(sd)
