"""Content negotiation: which of a route's response types an ``Accept`` header prefers (RFC 9110 12.5.1)."""

from __future__ import annotations

from collections.abc import Sequence


def _media_ranges(accept: str) -> list[tuple[str, str, float]]:
    """``(type, subtype, q)`` per media range, lower-cased; ranges with a malformed type or q are dropped."""
    ranges = []
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        kind, slash, subtype = media.lower().partition("/")
        if not slash or not kind or not subtype:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if 0.0 <= q <= 1.0:  # also drops NaN
            ranges.append((kind, subtype, q))
    return ranges


def _quality(offered: str, ranges: list[tuple[str, str, float]]) -> float:
    """The q the most specific matching range gives ``offered`` (exact > ``type/*`` > ``*/*``); 0 if none."""
    kind, _, subtype = offered.partition("/")
    best_specificity, q = -1, 0.0
    for range_kind, range_subtype, range_q in ranges:
        if range_kind == kind and range_subtype == subtype:
            specificity = 2
        elif range_kind == kind and range_subtype == "*":
            specificity = 1
        elif range_kind == "*" and range_subtype == "*":
            specificity = 0
        else:
            continue
        if specificity > best_specificity:
            best_specificity, q = specificity, range_q
        elif specificity == best_specificity:
            q = max(q, range_q)
    return q


def preferred_type(accept: str | None, offered: Sequence[str]) -> str | None:
    """The type of ``offered`` (lower-case, best default first) that ``accept`` prefers; None: none acceptable.

    The highest q wins; ties go to the earlier offered type. No ``Accept`` header, or one with no
    parseable range, accepts anything (the first offered type), as RFC 9110 allows.

    Example:
        >>> preferred_type("application/json, application/octet-stream;q=0.1",
        ...                ["application/json", "application/octet-stream"])
        'application/json'
    """
    ranges = _media_ranges(accept or "")
    if not ranges:
        return offered[0]
    scored = [(_quality(kind, ranges), -position, kind) for position, kind in enumerate(offered)]
    q, _, best = max(scored)
    return best if q > 0 else None
