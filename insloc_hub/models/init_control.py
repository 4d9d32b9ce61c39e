"""Build modules without running their weight initialisation (when every tensor is loaded next)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
)


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Within this block ``torch.nn.init`` functions do nothing, so modules keep uninitialised memory.

    Only for models whose every parameter and buffer is overwritten right after construction
    (``from_pretrained``): random init of ResNet-50-FPN costs more than reading its weights.

    Example:
        >>> with skip_init():
        ...     layer = nn.Linear(4, 4)  # weight is uninitialised memory until loaded
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, _keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _keep(tensor, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - mirrors torch.nn.init signatures
    return tensor
