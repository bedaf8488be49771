"""Weight formats by name: the registry every kernel asks (see :mod:`.base` for the contract).

Built-ins: ``int``, ``intz``, ``affine`` and ``fp8``. A new family is one new file — a
:class:`WeightFormat` subclass — named in a study config (``space.w_formats: [int, mypkg.formats:MyFormat]``, imported because the
user's own config says so) or registered from the user's code with ``register_format(MyFormat())``;
recipes then use it as ``w_format: <name>``. Nothing a recipe file says is imported: an
unregistered name is an error that lists the registered ones.
"""

from __future__ import annotations

import torch

from compsearch._plugins import import_target
from compsearch.errors import KernelError
from compsearch.kernels._quant_grid import QuantSpec, grouped
from compsearch.kernels.formats.affine import AffineFormat
from compsearch.kernels.formats.base import WeightFormat
from compsearch.kernels.formats.fp8 import Fp8Format
from compsearch.kernels.formats.int_grid import IntFormat, IntZeroFormat

FORMATS: dict[str, WeightFormat] = {}


def register_format(fmt: WeightFormat) -> WeightFormat:
    """Make ``fmt`` available to recipes, spaces, packing and deploy under ``fmt.name``."""
    if not isinstance(fmt, WeightFormat):
        raise KernelError(f"register_format: expected a WeightFormat instance, but got {fmt!r}.")
    FORMATS[fmt.name] = fmt
    return fmt


def load_format(target: str) -> WeightFormat:
    """Import ``module.path:Class`` (a WeightFormat subclass the user's own config names),
    register an instance and return it."""
    found = import_target(target, "w_formats", KernelError)
    if not (isinstance(found, type) and issubclass(found, WeightFormat)):
        raise KernelError(
            f"w_formats: expected a WeightFormat subclass, but {target!r} is {found!r}."
        )
    return register_format(found())


def get_format(name: str | None) -> WeightFormat:
    found = FORMATS.get(name or "int")
    if found is None:
        raise KernelError(
            f"w_format: expected one of the registered formats ({', '.join(FORMATS)}), but got "
            f"{name!r}. A format of your own is registered with "
            "compsearch.kernels.formats.register_format."
        )
    return found


def weight_scale(rows: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None) -> torch.Tensor:
    """Scales ``(rows, groups, width)`` of each row or group, as the format computes them
    (:meth:`WeightFormat.scales`: for integer grids the absolute maximum, times its clip factor
    from the MSE observer, over the largest level)."""
    return get_format(spec.w_format).scales(grouped(rows, spec), clip, spec)


register_format(IntFormat())
register_format(IntZeroFormat())
register_format(Fp8Format())
register_format(AffineFormat())

__all__ = [
    "FORMATS",
    "WeightFormat",
    "get_format",
    "load_format",
    "register_format",
    "weight_scale",
]
