"""``insloc-train pretrain`` and ``insloc-train export-weights``.

Every field of :class:`~insloc_hub.training.engine.PretrainConfig` is a flag (``--batch-size``,
``--queue-size``...; booleans also as ``--no-...``). Precedence: built-in defaults (the official
recipe) < ``--preset`` < explicit flags.

Examples::

    insloc-train pretrain --data photos/ --output runs/tiny --preset tiny          # CPU smoke run
    insloc-train pretrain --data imagenet/train --output runs/fpn200 --preset r50-fpn-200ep
    torchrun --nproc-per-node 8 -m insloc_hub.training.cli pretrain --data ... --output ... --resume auto
    insloc-train export-weights runs/fpn200/checkpoint_000100000.pt exported/
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from typing import Any

from .engine import EMBED_INITS, FIELD_HELP, PRETRAIN_PRESETS, PretrainConfig, export_checkpoint, resolve_config, train
from .insloc import PROJECTION_NORMS

__all__ = ["add_subcommands", "config_from_args", "run_pretrain", "run_export"]

logger = logging.getLogger(__name__)

_CHOICES = {
    "method": ("insloc", "moco"),
    "amp": ("auto", "on", "off"),
    "channels_last": ("auto", "on", "off"),
    "gpu_composition": ("auto", "on", "off"),
    "preset": tuple(sorted(PRETRAIN_PRESETS)),
    "embed_init": EMBED_INITS,
    "projection_norm": PROJECTION_NORMS,
}


def _base_type(annotation: Any) -> type:
    """``int`` for ``int``, ``str`` for ``str | None`` (annotations are strings under PEP 563)."""
    hints = typing.get_type_hints(PretrainConfig)
    if isinstance(annotation, str):
        annotation = hints.get(annotation, str)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0] if args else str
    return annotation


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(PretrainConfig)
    defaults = PretrainConfig.__dataclass_fields__
    required = parser.add_argument_group("required")
    tuning = parser.add_argument_group("hyper-parameters (defaults: the official FPN recipe)")
    system = parser.add_argument_group("system")
    for field in dataclasses.fields(PretrainConfig):
        name = field.name
        flag = "--" + name.replace("_", "-")
        kind = _base_type(hints[name])
        default = defaults[name].default
        help_text = FIELD_HELP.get(name, "")
        if default not in (None, "", dataclasses.MISSING):
            help_text += f" (default: {default})"
        group = required if name in ("data", "output") else (
            system if name in {"workers", "threads", "device", "amp", "channels_last", "compile", "gpu_composition",
                               "max_side", "checkpoint_every_steps", "keep_checkpoints", "log_every", "resume",
                               "deterministic", "data_root", "dataset_name", "max_steps"} else tuning)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=None, choices=_CHOICES.get(name), help=help_text,
                               metavar=None if name in _CHOICES else name.upper())


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The resolved :class:`PretrainConfig` of parsed ``pretrain`` arguments."""
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(PretrainConfig)}
    return resolve_config(overrides)


def run_pretrain(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    final = train(cfg)
    logger.info("done: %s", final)
    return 0


def run_export(args: argparse.Namespace) -> int:
    folder = export_checkpoint(args.checkpoint, args.directory)
    print(folder)
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pretrain`` and ``export-weights`` to the ``insloc-train`` dispatcher."""
    pretrain = subparsers.add_parser(
        "pretrain",
        help="InsLoc (or MoCo v2 baseline) pretraining on unlabelled images",
        description="InsLoc pretraining, faithful to limbo0000/InstanceLoc (configs/FPN/insloc_fpn_200ep.py). "
                    "Run under torchrun or srun for several GPUs; --batch-size is the global batch.",
    )
    _add_config_flags(pretrain)
    pretrain.set_defaults(func=run_pretrain)

    export = subparsers.add_parser(
        "export-weights",
        help="write the query backbone of a pretraining checkpoint as a hub folder",
        description="Export the query-side InsLocBackbone (trunk, FPN, box head; no projection, no key encoder) "
                    "of a checkpoint (or the newest checkpoint of a run folder) with save_pretrained.",
    )
    export.add_argument("checkpoint", help="checkpoint_*.pt file, or a run folder (its newest checkpoint)")
    export.add_argument("directory", help="output hub folder")
    export.set_defaults(func=run_export)
