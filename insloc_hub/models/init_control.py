"""Build modules without running their weight initialisation (when every tensor is loaded next)."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
)
_state = threading.local()
_lock = threading.Lock()
_originals: dict[str, Callable[..., Any]] = {}
_users = 0


def _skipping() -> bool:
    return getattr(_state, "depth", 0) > 0


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def init_or_skip(tensor, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - mirrors torch.nn.init
        return tensor if _skipping() else original(tensor, *args, **kwargs)

    return init_or_skip


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Within this block, in this thread, ``torch.nn.init`` functions leave tensors untouched.

    Only for models whose every parameter and buffer is overwritten right after construction
    (``from_pretrained``): random init of ResNet-50-FPN costs more than reading its weights. Other
    threads keep initialising normally: the patched functions check a thread-local flag, and the
    originals are restored when the last user leaves.

    Example:
        >>> with skip_init():
        ...     layer = nn.Linear(4, 4)  # weight is uninitialised memory until loaded
    """
    global _users
    with _lock:
        if _users == 0:
            for name in _INIT_FUNCTIONS:
                if hasattr(nn.init, name):
                    _originals[name] = getattr(nn.init, name)
                    setattr(nn.init, name, _wrap(name, _originals[name]))
        _users += 1
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        with _lock:
            _users -= 1
            if _users == 0:
                for name, original in _originals.items():
                    setattr(nn.init, name, original)
                _originals.clear()
