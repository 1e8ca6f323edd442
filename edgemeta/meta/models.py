"""Reference networks and loading of user model factories.

Meta-learning here is model-agnostic: anything built by a ``package.module:function`` factory that
returns an ``nn.Module`` can be meta-trained, as long as it is a pure function of its parameters.
BatchNorm is refused because its running statistics are buffers mutated in ``forward``: under the
functional inner loop they would leak information between tasks and silently differ from the ONNX
export that devices serve.

>>> import torch
>>> model = build_model({"arch": "mlp", "in_features": 1, "out_features": 1, "hidden": [40, 40]})
>>> [name for name, _ in model.named_parameters()][-2:]
['head.weight', 'head.bias']
>>> model(torch.zeros(3, 1)).shape
torch.Size([3, 1])
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


class ModelSpecError(ValueError):
    """A model spec or factory that cannot produce a usable network."""


class MLP(nn.Module):
    """Fully connected ReLU network: ``body`` is the embedding, ``head`` the last linear layer.

    The split matters: ANIL adapts only ``head`` and ProtoNet's adapted form replaces it.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (40, 40)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, int(size)), nn.ReLU()]
            width = int(size)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_factory(path: str):
    """Resolve ``"package.module:function"`` to the callable, with errors that name the path."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelSpecError(f"model factory {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"model factory {path!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        factory = getattr(module, attr)
    except AttributeError as exc:
        raise ModelSpecError(f"model factory {path!r}: {module_name!r} has no {attr!r}") from exc
    if not callable(factory):
        raise ModelSpecError(f"model factory {path!r} is not callable")
    return factory


def check_functional(model: nn.Module, origin: str) -> None:
    """Refuse modules whose forward depends on mutable state (BatchNorm running statistics)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ModelSpecError(
                f"{origin}: module {name!r} is {type(module).__name__}; BatchNorm keeps running "
                "statistics that leak between tasks in the inner loop. Use LayerNorm or GroupNorm."
            )
    if not any(True for _ in model.parameters()):
        raise ModelSpecError(f"{origin}: the model has no parameters to adapt")


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Build the network a bundle describes: the reference MLP or a user factory with kwargs."""
    if "factory" in spec:
        factory = load_factory(str(spec["factory"]))
        model = factory(**dict(spec.get("kwargs", {})))
        if not isinstance(model, nn.Module):
            raise ModelSpecError(
                f"model factory {spec['factory']!r} returned {type(model).__name__}, not nn.Module"
            )
        origin = f"model factory {spec['factory']!r}"
    elif spec.get("arch") == "mlp":
        try:
            model = MLP(int(spec["in_features"]), int(spec["out_features"]), spec.get("hidden", (40, 40)))
        except KeyError as exc:
            raise ModelSpecError(f"model spec for 'mlp' is missing {exc.args[0]!r}") from exc
        origin = "reference MLP"
    else:
        raise ModelSpecError(f"model spec needs 'arch': 'mlp' or 'factory': ..., got {dict(spec)!r}")
    check_functional(model, origin)
    return model


def head_names(model: nn.Module, spec: Mapping[str, Any] | None = None) -> list[str]:
    """Parameter names of the head: ``spec['head']`` prefix, else the last ``nn.Linear``.

    ANIL adapts these; ProtoNet writes its prototypes into them.
    """
    prefix = (spec or {}).get("head")
    if prefix is None:
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise ModelSpecError("cannot find a head: the model has no nn.Linear; set spec 'head'")
        prefix = linear[-1]
    names = [n for n, _ in model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
    if not names:
        raise ModelSpecError(f"head prefix {prefix!r} matches no parameter of the model")
    return names
