"""Exceptions a user of insloc-hub can meet, each with a message that says what to do.

Every error derives from :class:`InsLocError`, and also from the built-in exception a caller
would naturally catch (``ValueError``, ``FileNotFoundError``...), so existing handlers keep working.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, TypeVar

E = TypeVar("E", bound=BaseException)


class InsLocError(Exception):
    """Base class of every error raised on purpose by insloc-hub."""


def reworded(exc: E, message: str) -> E:
    """A copy of ``exc`` (same type and attributes, e.g. ``reason``) with ``message`` as its text.

    For callers that know better words for the same error: the CLI names its flags instead of Python
    arguments, ``push_to_hub`` names the user's folder instead of its staging copy.
    """
    clone = copy.copy(exc)
    clone.args = (message,)
    return clone


class InvalidImageError(InsLocError, ValueError):
    """An input could not be decoded as an image, or breaks a limit (size, pixels).

    ``reason`` says which, in a word a program can branch on (an API maps it to its HTTP status):

    - ``"empty"``: 0 bytes;
    - ``"missing"``: a path that is not an existing regular file;
    - ``"too_large"``: over ``max_bytes`` or ``max_pixels`` (or PIL's decompression-bomb guard);
    - ``"unsupported"``: not an image format PIL reads, a text-mode stream, an object that is not
      bytes/path/binary stream, or a pixel type with no defined range;
    - ``"truncated"``: the data stops before the pixels do (or is implausibly small for its size);
    - ``"corrupt"``: anything else the decoder refused, and float images holding NaN/inf.
    """

    REASONS = ("empty", "missing", "too_large", "unsupported", "truncated", "corrupt")

    def __init__(self, message: str, reason: str = "corrupt") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown InvalidImageError reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep ``reason`` when the error crosses a DataLoader worker or a pickle
        return (type(self), (str(self), self.reason))


class ImageGeometryError(InsLocError, ValueError):
    """A decoded image a model cannot take as it is (a side that its resize would shrink below 1 pixel).

    ``index`` is the image's position in the list given to the model; the message says how to fix it.
    """

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index

    def __reduce__(self):
        return (type(self), (str(self), self.index))


class ConfigError(InsLocError, ValueError):
    """An argument or a config value is invalid (unknown architecture, bad combination...)."""


class WeightsMismatchError(InsLocError, RuntimeError):
    """Pretrained tensors do not fit the model: missing, unexpected or wrongly shaped keys."""

    @classmethod
    def check(cls, expected: Mapping[str, Any], given: Mapping[str, Any], header: str, hint: str = "") -> None:
        """Raise one report of missing, unexpected and wrongly shaped keys, if there are any.

        ``expected`` is the model's ``state_dict()``, ``given`` the tensors offered for it.
        """
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        wrong = [f"{k}: given {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in given and given[k].shape != expected[k].shape]
        if not (missing or unexpected or wrong):
            return
        lines = [header]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                lines.append(f"  {len(keys)} {title}: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")
        raise cls("\n".join(lines + ([hint] if hint else [])))


class IntegrityError(InsLocError, RuntimeError):
    """A weights file does not match the checksum recorded in its config."""


class ModelNotFoundError(InsLocError, FileNotFoundError):
    """A model name, alias, repo or revision could not be resolved (locally or on the Hub)."""


class HubAccessError(ModelNotFoundError, PermissionError):
    """The Hub refused the token (HTTP 401/403): missing, invalid, or without the needed rights.

    A :class:`ModelNotFoundError` (so every resolution failure is caught by one ``except``) that is
    also a :class:`PermissionError`.
    """


class DatasetError(InsLocError, ValueError):
    """A dataset path or annotation file cannot be used (missing, empty, malformed)."""


class CheckpointError(InsLocError, RuntimeError):
    """A training checkpoint is unreadable or belongs to another configuration."""


class MissingDependencyError(InsLocError, ImportError):
    """An optional package (onnxruntime, TensorRT...) or a GPU is needed; the message says what to install."""


class ExportError(InsLocError, RuntimeError):
    """An export failed or its result differs from the PyTorch model beyond tolerance (figures in the message)."""
