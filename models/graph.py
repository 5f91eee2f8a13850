"""A small ONNX graph writer shared by the per-version model modules (rwkv4.py, rwkv7.py).

It writes a graph node by node with readable names; the model modules say what the nodes are.
Needs ``onnx`` (the export machine has it; the board never imports models/).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

OPSET = 16


def as_np(t) -> np.ndarray:
    """A checkpoint tensor (torch or numpy) as float32 numpy."""
    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def dims(t) -> tuple:
    return tuple(int(d) for d in t.shape)


def vi(name, dtype, shape):
    from onnx import helper

    return helper.make_tensor_value_info(name, dtype, shape)


class Builder:
    """Nodes, initialisers and unique names for one graph."""

    def __init__(self, prefix: str = ""):
        self.nodes, self.inits = [], []
        self._n = 0
        self.prefix = prefix

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        arr = np.asarray(value)
        full = self.prefix + name
        self.inits.append(numpy_helper.from_array(arr, full))
        return full

    def op(self, op_type: str, *inputs: str, name: str = "", out: str = "", **attrs) -> str:
        from onnx import helper

        self._n += 1
        node_name = self.prefix + (name or f"{op_type}_{self._n}")
        out = out or node_name + "_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=node_name, **attrs))
        return out

    def layer_norm(self, x: str, w: np.ndarray, b: np.ndarray, tag: str, eps: float = 1e-5) -> str:
        """Decomposed LayerNorm over the last axis (ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add)."""
        mean = self.op("ReduceMean", x, name=f"{tag}.mean", axes=[-1])
        d = self.op("Sub", x, mean, name=f"{tag}.sub")
        var = self.op(
            "ReduceMean",
            self.op("Pow", d, self.const(f"{tag}.two", np.float32(2.0)), name=f"{tag}.pow"),
            name=f"{tag}.var",
            axes=[-1],
        )
        std = self.op(
            "Sqrt",
            self.op("Add", var, self.const(f"{tag}.eps", np.float32(eps)), name=f"{tag}.add_eps"),
            name=f"{tag}.sqrt",
        )
        y = self.op("Div", d, std, name=f"{tag}.div")
        y = self.op("Mul", y, self.const(f"{tag}.weight", w), name=f"{tag}.scale")
        return self.op("Add", y, self.const(f"{tag}.bias", b), name=f"{tag}.shift")

    def reshape(self, x: str, shape, tag: str, out: str = "") -> str:
        return self.op("Reshape", x, self.const(f"{tag}.shape", np.array(shape, np.int64)), name=tag, out=out)

    def rows(self, x: str, mats, tag: str, acts=(), out: str = "", shape=None, row_in: bool = False) -> str:
        """``x[K]`` through row-form MatMuls ``[1, K] @ W[K, N]`` (with an activation between
        consecutive ones, ``acts[j]`` after the j-th, '' for none), back to a vector, or to
        ``shape`` (``[1, N]``: the row itself, no Reshape). ``row_in``: ``x`` is already [1, K]."""
        k = mats[0].shape[0]
        y = x if row_in else self.reshape(x, [1, k], f"{tag}.to_row")
        for j, w in enumerate(mats):
            y = self.op(
                "MatMul",
                y,
                self.const(f"{tag}.{j}.weight", np.ascontiguousarray(w)),
                name=f"{tag}.{j}" if len(mats) > 1 else tag,
            )
            act = acts[j] if j < len(acts) else ""
            if act:
                y = self.op(act, y, name=f"{tag}.{act.lower()}{j}")
        n = int(mats[-1].shape[1])
        if shape is None:
            return self.reshape(y, [n], f"{tag}.to_vec", out=out)
        if list(shape) == [1, n] and not out:
            return y
        return self.reshape(y, list(shape), f"{tag}.to_heads", out=out)

    def model(self, inputs, outputs, name: str, opset: int = OPSET):
        from onnx import helper

        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="rwkv2rknn"
        )
        m.ir_version = 8
        return m


def shape_error(sd: Mapping[str, object], expected: Mapping[str, tuple], what: str):
    """The first missing key or wrong shape among ``expected`` as an UnsupportedModel, or None."""
    from rwkv2rknn.errors import UnsupportedModel

    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return UnsupportedModel(
            f"not an {what} checkpoint: key '{missing[0]}'{more} missing",
            f"give an official {what} .pth checkpoint",
        )
    for key, want in expected.items():
        got = dims(sd[key])
        if got != want and not (len(want) == 3 and want[:2] == (1, 1) and got == want[2:]):
            return UnsupportedModel(
                f"not an {what} checkpoint: '{key}' has shape {list(got)}, expected {list(want)}",
                f"the checkpoint is damaged or not {what}",
            )
    return None
