"""``insloc-train pretrain`` and ``insloc-train export-weights``.

Every field of :class:`~insloc_hub.training.pretraining.engine.PretrainConfig` is a flag (``--batch-size``,
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

from insloc_hub.configs import add_config_flags, output_folder
from insloc_hub.training.pretraining.engine import PretrainConfig, export_checkpoint, resolve_config, train
from insloc_hub.training.runtime.run import INTERRUPTED_HINT

__all__ = ["add_subcommands", "config_from_args", "run_pretrain", "run_export"]

logger = logging.getLogger(__name__)

_SYSTEM_FIELDS = ("workers", "threads", "device", "amp", "channels_last", "compile", "gpu_composition", "max_side",
                  "checkpoint_every_steps", "keep_checkpoints", "log_every", "resume", "deterministic", "data_root",
                  "dataset_name", "max_steps", "tensorboard")
_GROUPS = {
    "required": ("data", "output"),
    "hyper-parameters (defaults: the official FPN recipe)": tuple(
        f.name for f in dataclasses.fields(PretrainConfig) if f.name not in ("data", "output", *_SYSTEM_FIELDS)),
    "system": _SYSTEM_FIELDS,
}


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The run's config from parsed ``pretrain`` flags: defaults < ``--preset`` < the flags given."""
    return resolve_config({f.name: getattr(args, f.name, None) for f in dataclasses.fields(PretrainConfig)})


def run_pretrain(args: argparse.Namespace) -> int:
    logger.info("done: %s", train(config_from_args(args)))
    return 0


def run_export(args: argparse.Namespace) -> int:
    print(export_checkpoint(args.checkpoint, args.directory, overwrite=args.overwrite))
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pretrain`` and ``export-weights`` to the ``insloc-train`` dispatcher."""
    pretrain = subparsers.add_parser(
        "pretrain",
        help="InsLoc (or MoCo v2 baseline) pretraining on unlabelled images",
        description="InsLoc pretraining, faithful to limbo0000/InstanceLoc (configs/FPN/insloc_fpn_200ep.py). "
                    "Run under torchrun for several GPUs; --batch-size is the global batch.",
    )
    add_config_flags(pretrain, PretrainConfig, required=("data", "output"), groups=_GROUPS)
    pretrain.set_defaults(func=run_pretrain, interrupted_hint=INTERRUPTED_HINT)

    export = subparsers.add_parser(
        "export-weights",
        help="write the query backbone of a pretraining checkpoint as a hub folder",
        description="Export the query-side InsLocBackbone (trunk, FPN, box head; no projection, no key encoder) "
                    "of a checkpoint (or the newest checkpoint of a run folder) with save_pretrained.",
    )
    export.add_argument("checkpoint", help="checkpoint_*.pt file, or a run folder (its newest checkpoint)")
    export.add_argument("directory", type=output_folder, help="output hub folder")
    export.add_argument("--overwrite", action="store_true",
                        help="replace another model already in the folder (a fine-tuned detector, another program's "
                             "files), removing its files")
    export.set_defaults(func=run_export, cli_words={"pass overwrite=True": "pass --overwrite"})
