"""Patch adapted weights into the bundle's ONNX template instead of re-exporting the graph.

An adapted model differs from the meta-initialization only in its initializer values, so the graph
exported once at meta-training time is reused: each patch is a protobuf copy with new bytes, which
takes milliseconds where ``torch.onnx.export`` takes seconds. Every tensor is checked against the
template (name, shape, dtype, finiteness) because a wrong tensor here would be served.

>>> import numpy as np, onnx
>>> from onnx import helper, numpy_helper, TensorProto
>>> w = numpy_helper.from_array(np.ones((2, 1), np.float32), "w")
>>> graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])], [w])
>>> template = OnnxTemplate(helper.make_model(graph).SerializeToString())
>>> patched = template.patch({"w": np.full((2, 1), 3.0, np.float32)})
>>> float(numpy_helper.to_array(onnx.load_from_string(patched).graph.initializer[0])[0, 0])
3.0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper


def _structure(proto: onnx.ModelProto) -> bytes:
    """The model with every initializer's values dropped: what must not change between versions."""
    shape = onnx.ModelProto()
    shape.CopyFrom(proto)
    for init in shape.graph.initializer:
        for name in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
            init.ClearField(name)
    shape.ClearField("producer_version")
    return shape.SerializeToString(deterministic=True)


class WeightPatchError(ValueError):
    """Weights that do not fit the template; the message names the tensor."""


class OnnxTemplate:
    """The exported graph whose initializers (``parameter_names``, default all) may be replaced."""

    def __init__(self, model: bytes | onnx.ModelProto, parameter_names: Iterable[str] | None = None):
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
        self._proto = proto
        self._index = {init.name: i for i, init in enumerate(proto.graph.initializer)}
        self._specs = {
            init.name: (tuple(init.dims), onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
            for init in proto.graph.initializer}
        names = list(self._index) if parameter_names is None else list(parameter_names)
        unknown = [n for n in names if n not in self._index]
        if unknown:
            raise WeightPatchError(f"template has no initializer(s) {unknown}")
        self.parameter_names = frozenset(names)
        self._shape = _structure(proto)

    def mismatch(self, model: bytes) -> str | None:
        """Why ``model`` is not this template with other weights (None when it is).

        A registry version is served only if it is the bundle's graph: a foreign model whose
        manifest checksum happens to match (or was rewritten to match) is refused here.
        """
        try:
            proto = onnx.load_from_string(model)
        except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError types
            return f"not an ONNX model ({type(exc).__name__})"
        if _structure(proto) != self._shape:
            return "its graph, inputs or initializers differ from the bundle's model"
        inits = proto.graph.initializer
        index = {init.name: i for i, init in enumerate(inits)}
        for name in self.parameter_names:
            arr = numpy_helper.to_array(inits[index[name]])
            if not np.isfinite(arr).all():
                return f"tensor {name!r} contains NaN or infinite values"
        return None

    def weights(self) -> dict[str, np.ndarray]:
        """The template's own values of the patchable tensors."""
        inits = self._proto.graph.initializer
        return {n: numpy_helper.to_array(inits[self._index[n]]) for n in self.parameter_names}

    def check(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``weights`` against the template; returns contiguous arrays ready to write."""
        missing = sorted(self.parameter_names - set(weights))
        extra = sorted(set(weights) - self.parameter_names)
        if missing or extra:
            raise WeightPatchError(
                f"weights do not match the template: missing {missing}, unexpected {extra}")
        checked = {}
        for name, value in weights.items():
            arr = np.asarray(value)
            shape, dtype = self._specs[name]
            if arr.shape != shape:
                raise WeightPatchError(f"tensor {name!r}: shape {arr.shape}, template has {shape}")
            if arr.dtype != dtype:
                raise WeightPatchError(f"tensor {name!r}: dtype {arr.dtype}, template has {dtype}")
            if not np.isfinite(arr).all():
                raise WeightPatchError(f"tensor {name!r}: contains NaN or infinite values")
            checked[name] = np.ascontiguousarray(arr)
        return checked

    def patch_proto(self, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        checked = self.check(weights)
        model = onnx.ModelProto()
        model.CopyFrom(self._proto)
        inits = model.graph.initializer
        for name, arr in checked.items():
            init = inits[self._index[name]]
            for field in ("float_data", "double_data", "int32_data", "int64_data"):
                init.ClearField(field)
            init.raw_data = arr.tobytes()
        return model

    def patch(self, weights: Mapping[str, np.ndarray]) -> bytes:
        """The serialized adapted model: the template with ``weights`` as its initializers."""
        return self.patch_proto(weights).SerializeToString()
