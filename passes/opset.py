"""The opset every file is brought to before the graph passes (the loader calls ``to_opset``).

::

    opset 13..16, no op changed since   -> the opset number only
    opset 13..16, an op changed since   -> onnx.version_converter (weights lifted out and back)
    opset 18                            -> by hand: reductions take their axes as an attribute
    opset 19 .. 23                      -> the number 18 (every op used must mean at 18 what it
                                           means at its version: only new types or attributes
                                           left at their defaults), then as opset 18

Opsets 13 to 18 differ in where ReduceMean, Split, Squeeze and Unsqueeze keep their axes. onnx's
version converter has no adapters down from 19 (``No Adapter From Version $19 for Constant``),
so newer files come down by hand; the norm ops only newer opsets have (GroupNormalization,
RMSNormalization) are lowered before (``canonicalize.lower_norms``).
"""

from __future__ import annotations

from rwkv2rknn.errors import UnsupportedModel

OPSET = 17


def to_opset(model, what: str = "the model"):
    """``model`` at opset ``OPSET``: older files are upgraded by onnx.version_converter; opset 18
    files are brought down by hand (``_from_opset18``: the reductions' axes input becomes their
    attribute), since the converter's downgrade crashes the process on some reductions."""
    from onnx import version_converter

    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None or version == OPSET:
        return model
    if not 13 <= version <= NEWEST:
        raise UnsupportedModel(
            f"{what} uses ONNX opset {version}", f"export it again with an opset from 13 to {NEWEST}"
        )
    if version > 18:
        _to_opset18(model, version, what)
        version = 18
    if version == 18:
        return _from_opset18(model, what)
    if _unchanged_ops(model, version):  # nothing for the converter to do but the number
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = OPSET
        return model
    weights = _lift_weights(model)
    try:
        out = version_converter.convert_version(model, OPSET)
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds
        raise UnsupportedModel(
            f"{what} (opset {version}) cannot be converted to opset {OPSET} ({str(e).splitlines()[0][:100]})",
            f"export it again with opset {OPSET}",
        ) from e
    finally:
        _put_back(model, weights)
    _put_back(out, weights)
    return out


def _unchanged_ops(model, version: int) -> bool:
    """True if every op of the model's default domain has the same definition at ``version``
    and at ``OPSET`` (no op of it changed in between, so converting changes nothing else)."""
    from onnx import defs

    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    try:
        return all(defs.get_schema(op, OPSET, "").since_version <= version for op in ops)
    except Exception:  # noqa: BLE001 - an op onnx does not know: let the converter say so
        return False


_LIFT_ABOVE = 1024  # bytes: initializers the version converter need not copy


def _lift_weights(model) -> dict:
    """Take the large initializers' bytes out of ``model`` (each left as an external-data
    placeholder of its name, type and shape): the converter serialises, parses and copies the
    whole model, and an adapter never reads a weight's values. Returns {name: bytes}."""
    from onnx import TensorProto

    lifted = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and t.HasField("raw_data") and t.ByteSize() >= _LIFT_ABOVE:
            lifted[t.name] = t.raw_data
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value="lifted")
    return lifted


def _put_back(model, lifted: dict) -> None:
    """Undo ``_lift_weights`` on ``model`` (or on the converter's output)."""
    for t in model.graph.initializer:
        if t.name in lifted and not t.HasField("raw_data"):  # (the converter's output keeps no external_data)
            del t.external_data[:]
            t.ClearField("data_location")
            t.raw_data = lifted[t.name]


NEWEST = 23  # the newest opset read (onnx 1.18 knows 23)

# Ops (default domain) whose definitions from opset 19 to 23 only add types (bfloat16, float8,
# int4, ...) or attributes whose defaults keep their opset 18 meaning; {op: attribute values
# that would change it}.
_SAME_AS_18 = {
    "Cast": {},
    "CastLike": {},
    "Constant": {},
    "ConstantOfShape": {},
    "Equal": {},
    "Identity": {},
    "Reshape": {},
    "Shape": {},
    "Size": {},
    "Flatten": {},
    "Squeeze": {},
    "Unsqueeze": {},
    "Transpose": {},
    "ReduceMax": {},
    "ReduceMin": {},
    "IsInf": {},
    "IsNaN": {},
    "Pad": {"mode": (b"wrap",)},
    "InstanceNormalization": {},
    "LpNormalization": {},
    "QuantizeLinear": {},
    "DequantizeLinear": {},
    "QLinearMatMul": {},
    # bfloat16 only (opset 22)
    "Acos": {},
    "Acosh": {},
    "Asin": {},
    "Asinh": {},
    "Atan": {},
    "Atanh": {},
    "Cos": {},
    "Cosh": {},
    "Sin": {},
    "Sinh": {},
    "Tan": {},
    "Elu": {},
    "Selu": {},
    "HardSigmoid": {},
    "HardSwish": {},
    "Mish": {},
    "Softplus": {},
    "Softsign": {},
    "ThresholdedRelu": {},
    "Round": {},
    "Dropout": {},
    "EyeLike": {},
    "Conv": {},
    "ConvTranspose": {},
    "GlobalAveragePool": {},
    "GlobalMaxPool": {},
    "MaxPool": {},
    "Det": {},
}


def _to_opset18(model, version: int, what: str) -> None:
    """An opset 19..23 model relabelled 18, in place, if every op of the default domain means
    at 18 what it means at ``version``; else a one-line refusal naming the op."""
    from onnx import defs, helper

    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        try:
            since = defs.get_schema(n.op_type, version, "").since_version
        except Exception:  # noqa: BLE001 - not an op of this opset
            raise UnsupportedModel(
                f"{what} (opset {version}) uses {n.op_type}, which ONNX does not define at opset {version}",
                "export it again",
            ) from None
        if since <= 18:
            continue
        bad = _SAME_AS_18.get(n.op_type)
        changed = bad is None or any(
            helper.get_attribute_value(a) in bad.get(a.name, ()) for a in n.attribute
        )
        if changed:
            raise UnsupportedModel(
                f"{what} (opset {version}) uses {n.op_type} in its opset {since} "
                f"form, which opset {OPSET} cannot express",
                "export it again with opset 18 or older",
            )
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 18


# ops whose opset 18 form differs from opset 17 in a way the graph may use
_REDUCE18 = {
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}
_CHANGED18 = {
    "Pad",
    "Resize",
    "ScatterElements",
    "ScatterND",
    "Split",
    "Col2Im",
    "CenterCropPad",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
    "BitwiseNot",
    "OptionalHasElement",
    "OptionalGetElement",
    "GroupNormalization",
}


def _from_opset18(model, what: str):
    """An opset 18 model at opset 17: reductions take their axes as an attribute again."""
    from onnx import helper, numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for n in model.graph.node:
        if n.op_type in _REDUCE18:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            axes = n.input[1] if len(n.input) > 1 and n.input[1] else ""
            if int(attrs.get("noop_with_empty_axes", 0)) or (axes and axes not in consts):
                raise UnsupportedModel(
                    f"{what} (opset 18) has a {n.op_type} with computed axes",
                    f"export it again with opset {OPSET}",
                )
            del n.input[1:]
            keep = [a for a in n.attribute if a.name != "noop_with_empty_axes"]
            del n.attribute[:]
            n.attribute.extend(keep)
            if axes:
                n.attribute.append(helper.make_attribute("axes", [int(a) for a in consts[axes].reshape(-1)]))
        elif (
            n.op_type == "Split"
            and any(a.name == "num_outputs" for a in n.attribute)
            or n.op_type in _CHANGED18 - {"Split"}
            and n.op_type != "ScatterND"
        ):
            raise UnsupportedModel(
                f"{what} (opset 18) uses {n.op_type} in its opset 18 form",
                f"export it again with opset {OPSET}",
            )
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = OPSET
    return model
