"""Checkpoints in the official InstanceLoc (mmdet) layout, made from our modules for the converter's tests.

The official names come from the converter's own table (``convert._official_names``): the tests check
that :func:`~insloc_hub.convert.convert_official` inverts this, and assert some official names literally.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch

from insloc_hub.convert import _official_names
from insloc_hub.errors import ConfigError
from insloc_hub.models import InsLocBackbone


def _to_official_key(key: str, variant: str) -> str:
    official = next((off + key[len(ours):] for off, ours in _official_names(variant) if key.startswith(ours)), None)
    if official is None:
        raise ConfigError(f"{key!r} has no place in the official {variant} layout")
    return official


def official_state_dict_from_bundle(
    bundle: InsLocBackbone, *, with_momentum: bool = True, queue_size: int = 64, embed_dim: int = 128,
    ddp_prefix: bool = False, path: str | os.PathLike[str] | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Produce a checkpoint in the official layout from our modules: ``{"state_dict": ..., "meta": {"epoch": 200}}``.

    The query side carries the bundle's tensors under mmdet names (``backbone.*``, ``neck.*``,
    ``roi_head.bbox_head.shared_convs/shared_fcs.0``; C4: ``roi_head.shared_head.layer4.*``). The
    pretraining projection the bundle does not hold is made up (random): ``shared_fcs.1`` and
    ``fc_cls`` for FPN, ``bbox_head.shared_fcs.0`` and ``fc_cls`` for C4 (whose head is unreleased).
    With ``with_momentum``, ``backbone_k``/``neck_k``/``roi_head_k`` copies and the ``queue``,
    ``queues`` and ``queue_ptr`` buffers are added as in ``InsLocFPN``. The tests check that
    :func:`convert_official` inverts it; ``path`` also ``torch.save``s it there.
    """
    variant = bundle.config.variant
    gen = torch.Generator().manual_seed(seed)
    query: dict[str, torch.Tensor] = OrderedDict()
    for key, value in bundle.state_dict().items():
        query[_to_official_key(key, variant)] = value.detach().cpu().clone()
    if "box_head" in bundle.config.parts:
        dim = bundle.config.head_fc if variant == "fpn" else bundle.embedding_dim
        fc = "shared_fcs.1" if variant == "fpn" else "shared_fcs.0"
        query[f"roi_head.bbox_head.{fc}.weight"] = torch.randn(dim, dim, generator=gen) * 0.01
        query[f"roi_head.bbox_head.{fc}.bias"] = torch.zeros(dim)
        query["roi_head.bbox_head.fc_cls.weight"] = torch.randn(embed_dim, dim, generator=gen) * 0.01
        query["roi_head.bbox_head.fc_cls.bias"] = torch.zeros(embed_dim)
    state: dict[str, torch.Tensor] = OrderedDict(query)
    if with_momentum:
        for key, value in query.items():
            head, rest = key.split(".", 1)
            state[f"{head}_k.{rest}"] = value.clone()
        levels = 4 if variant == "fpn" else 1
        queues = torch.nn.functional.normalize(torch.randn(levels, embed_dim, queue_size, generator=gen), dim=1)
        state["queue"] = queues[-1].clone()
        state["queues"] = queues
        state["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    if ddp_prefix:
        state = OrderedDict((f"module.{k}", v) for k, v in state.items())
    checkpoint = {"state_dict": state, "meta": {"epoch": 200, "iter": 200 * 5005, "mmdet_version": "2.1.0"}}
    if path is not None:
        torch.save(checkpoint, path)
    return checkpoint
