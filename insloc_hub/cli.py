"""``insloc-hub``: inspect, fetch, publish and convert pretrained models.

Subcommands: ``info``, ``download``, ``push``, ``list``, ``convert``, ``export-d2``, ``demo``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from insloc_hub.configs import int_at_least, output_file, output_folder
from insloc_hub.detectors import ARCHITECTURES
from insloc_hub.errors import InsLocError
from insloc_hub.models import PRESETS


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DeprecatedAlias(argparse.Action):
    """An old flag name kept for one release: stores like the new one and warns (DeprecationWarning)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        new = "--" + self.dest.replace("_", "-")
        warnings.warn(f"{option_string} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def in_cli_words(text: str, words: Mapping[str, str]) -> str:
    """``text`` with the library's Python wording (``strict=False``) replaced by the command's flags.

    Library errors speak to API callers; a command line user needs the flag that does the same.
    Each subcommand lists its replacements as the ``cli_words`` default of its parser.

    Example:
        >>> in_cli_words("Pass strict=False to drop them", {"Pass strict=False": "Pass --no-strict"})
        'Pass --no-strict to drop them'
    """
    for python, flag in words.items():
        text = text.replace(python, flag)
    return text


#: the Python wording of the Hub layer's messages -> the flags of info/download/push
_HUB_WORDS = {"revision=": "--revision ", "local_files_only=True": "--local-files-only", "pass token=": "pass --token",
              "create_pr=True": "--create-pr", "namespace= or ": ""}
_CONVERT_WORDS = {"Pass strict=False": "Pass --no-strict", "because strict=False": "because of --no-strict",
                  "pass variant='fpn' or 'c4'": "pass --variant fpn or --variant c4",
                  "use variant='auto'": "omit --variant to detect it", "pass overwrite=True": "pass --overwrite"}
_EXPORT_D2_WORDS = {"Export with c4=False": "Omit --c4 (the FPN layout)"}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def cmd_info(args: argparse.Namespace) -> int:
    from insloc_hub.hub import resolve_model_dir
    from insloc_hub.pretrained import read_config, verify_weights

    folder = resolve_model_dir(args.name, revision=args.revision, cache_dir=args.cache_dir,
                               local_files_only=args.local_files_only or None)
    config = read_config(folder)
    arch, weights = config["architecture"], config["weights"]  # both checked by read_config
    if args.json:
        print(json.dumps({"folder": str(folder), "config": config}, indent=2))
        return 0
    print(f"name:        {config.get('name')}")
    print(f"folder:      {folder}")
    print(f"task:        {config.get('task')}")
    print(f"arch:        ResNet-{arch.get('depth', '?')} width {arch.get('width', '?')}, "
          f"variant {arch.get('variant', '?')}")
    print(f"pretrained:  {', '.join(config.get('pretrained_parts', []))}")
    if config.get("task") == "detection":
        det = config["detector"]
        classes = ", ".join(map(str, det.get("class_names") or [])) or det.get("num_classes", "?")
        print(f"detector:    {det.get('arch', '?')}, classes: {classes}")
    for key, value in _dict(config.get("provenance")).items():
        if isinstance(value, list):  # e.g. deviations_from_official: one line each
            print(f"provenance:  {key} =")
            for item in value:
                print(f"               - {item}")
        elif not isinstance(value, dict):
            print(f"provenance:  {key} = {value}")
    for result in [r for r in config.get("results") or [] if isinstance(r, dict)]:
        metrics = ", ".join(f"{k} {v}" for k, v in _dict(result.get("metrics")).items())
        print(f"result:      {result.get('dataset')}: {metrics}")
    print("files:")
    for name in config.get("files") or []:
        path = folder / str(name)
        size = _human(path.stat().st_size) if path.exists() else "MISSING"
        print(f"  {name:<24} {size:>10}")
    status = "not checked"
    if args.verify:
        verify_weights(folder, config, always=True)
        status = "verified"
    print(f"sha256:      {weights.get('sha256', 'not recorded')} ({status})")
    print(f"parameters:  {weights.get('num_parameters', '?')}")
    return 0


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def cmd_download(args: argparse.Namespace) -> int:
    from insloc_hub.hub import download

    folder = download(args.name, revision=args.revision, cache_dir=args.cache_dir, token=args.token)
    print(folder)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from insloc_hub.pretrained import push_to_hub

    commit = push_to_hub(args.directory, args.repo_id, revision=args.revision, private=args.private,
                         token=args.token, commit_message=args.message, create_pr=args.create_pr)
    print(commit)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from insloc_hub.hub import ALIASES, alias_repo_id, list_cached

    cached = list_cached(args.cache_dir)
    print("aliases:")
    for alias in ALIASES:
        print(f"  {alias:<24} -> {alias_repo_id(alias)}")
    print("cached:" if cached else "cached: (none)")
    for entry in cached:
        revisions = ", ".join(r["commit"][:12] for r in entry.get("revisions", []))
        print(f"  {entry['repo_id']:<40} {_human(entry.get('size_on_disk', 0)):>10}  {revisions}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from insloc_hub.convert import convert_to_folder

    options: dict[str, Any] = {"variant": args.variant} if args.variant else {}
    folder, report = convert_to_folder(args.source_format, args.source, args.output, strict=not args.no_strict,
                                       overwrite=args.overwrite, **options)
    print(in_cli_words(report.summary(), args.cli_words))
    print(f"wrote {folder}")
    return 0


def cmd_export_d2(args: argparse.Namespace) -> int:
    from insloc_hub.convert import export_detectron2

    report = export_detectron2(args.name, args.output, c4=args.c4 or None)
    print(report.summary())
    print(f"wrote {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a detector from a freshly saved backbone folder, then train a step and detect on a photo."""
    import torch

    from insloc_hub.detectors import build_detector
    from insloc_hub.models import InsLocBackbone
    from insloc_hub.pretrained import from_pretrained, save_pretrained
    from insloc_hub.transforms import decode_image, to_tensor

    torch.manual_seed(0)
    image = to_tensor(decode_image(args.image) if args.image else _sample_photo())
    preset = args.preset or ("r50-c4" if args.arch == "faster_rcnn_c4" else "r50-fpn")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = save_pretrained(InsLocBackbone(preset), Path(tmp) / "backbone")
        bundle = from_pretrained(folder)
        print(f"saved and reloaded a {preset} backbone bundle (hub folder) in {time.perf_counter() - start:.2f}s")
    detector = build_detector(args.arch, class_names=["object"], pretrained=bundle, min_size=args.size,
                              max_size=int(args.size * 1.667))
    print(detector.load_report.summary())
    h, w = image.shape[1:]
    x1, y1, x2, y2 = int(w * 0.25), int(h * 0.25), int(w * 0.75), int(h * 0.75)
    target = {"boxes": torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), "labels": torch.tensor([1])}
    if args.arch == "mask_rcnn_fpn":
        target["masks"] = torch.zeros(1, h, w, dtype=torch.uint8)
        target["masks"][0, y1:y2, x1:x2] = 1
    detector.train()
    losses = detector([image], [target])
    sum(losses.values()).backward()
    print("training step: " + ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items()))
    detector.eval()
    start = time.perf_counter()
    with torch.no_grad():
        out = detector([image])[0]
    print(f"inference on a {w}x{h} photo: {len(out['boxes'])} boxes in {time.perf_counter() - start:.2f}s "
          "(random detection layers: boxes are not meaningful until fine-tuned)")
    return 0


def _sample_photo() -> Any:
    try:
        from skimage import data
    except ImportError as exc:
        raise InsLocError("the demo photo comes from scikit-image: pip install 'insloc-hub[demo]', "
                          "or pass --image PATH") from exc
    from PIL import Image

    return Image.fromarray(data.astronaut())


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="insloc-hub", description="Inspect, fetch, publish and convert "
                                     "InsLoc pretrained models (hub folders: safetensors + config + card).")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="config, card summary, files, sizes and sha256 of a model")
    p.add_argument("name", help="alias, owner/repo[@revision] or local folder")
    p.add_argument("--revision")
    p.add_argument("--cache-dir")
    p.add_argument("--local-files-only", action="store_true")
    p.add_argument("--verify", action="store_true", help="re-hash the weights against config.json")
    p.add_argument("--json", action="store_true", help="print the config as JSON")
    p.set_defaults(func=cmd_info, cli_words=_HUB_WORDS)

    p = sub.add_parser("download", help="fetch a model into the Hugging Face cache (for offline use)")
    p.add_argument("name")
    p.add_argument("--revision")
    p.add_argument("--cache-dir")
    p.add_argument("--token")
    p.set_defaults(func=cmd_download, cli_words=_HUB_WORDS)

    p = sub.add_parser("push", help="upload a hub folder to the Hugging Face Hub")
    p.add_argument("directory")
    p.add_argument("repo_id")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token")
    p.add_argument("--message", help="commit message")
    p.add_argument("--create-pr", action="store_true")
    p.set_defaults(func=cmd_push, cli_words=_HUB_WORDS)

    p = sub.add_parser("list", help="known aliases and cached models")
    p.add_argument("--cache-dir")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("convert", help="convert an official InsLoc, torchvision or MoCo checkpoint to a hub folder")
    p.add_argument("source_format", choices=["official", "torchvision", "moco"])
    p.add_argument("source", help="checkpoint file (.pth)")
    p.add_argument("output", type=output_folder, help="hub folder to write")
    p.add_argument("--variant", choices=["fpn", "c4"], help="default: detected (official) or fpn")
    p.add_argument("--no-strict", action="store_true", help="drop unknown keys instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace the model OUTPUT holds even if it is another "
                   "kind (e.g. a fine-tuned detector), removing its files the new folder does not list")
    p.set_defaults(func=cmd_convert, cli_words=_CONVERT_WORDS)

    p = sub.add_parser("export-d2", help="write a detectron2 .pkl as the official convert_pretrained.py does")
    p.add_argument("name", help="alias, repo or folder of a backbone")
    p.add_argument("output", type=output_file, help="output .pkl")
    p.add_argument("--c4", action="store_true", help="C4 layout (res5 as roi_heads.res5)")
    p.set_defaults(func=cmd_export_d2, cli_words=_EXPORT_D2_WORDS)

    p = sub.add_parser("demo", help="save/load a backbone, build a detector, train a step, detect on a photo")
    p.add_argument("--arch", default="faster_rcnn_fpn", choices=ARCHITECTURES)
    p.add_argument("--preset", choices=sorted(PRESETS), help="architecture preset (default: r50-fpn, or r50-c4 for "
                   "faster_rcnn_c4)")
    p.add_argument("--backbone", dest="preset", choices=sorted(PRESETS), action=DeprecatedAlias, help=argparse.SUPPRESS)
    p.add_argument("--image", help="an image file (default: scikit-image's astronaut photo)")
    p.add_argument("--size", type=int_at_least(128), default=480,
                   help="shorter side the detector resizes to (at least 128: the coarsest level needs a few pixels)")
    p.set_defaults(func=cmd_demo)
    return parser


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None, *, long_running: bool = False) -> int:
    """Parse ``argv`` and run ``args.func(args)``: how every insloc CLI starts, fails and stops.

    Logs WARNING and up (INFO with timestamps if ``long_running``; DEBUG with ``-v``). A user error
    (:class:`InsLocError`) prints one line, ``prog command: error: ...`` (Python arguments in it
    named as the command's flags, see :func:`in_cli_words`), and returns 2 like a bad flag; Ctrl-C
    prints one line and returns 130: the interrupt's own message (a training run says which
    checkpoint it saved), else the subcommand's ``interrupted_hint`` default, if it set one; a closed
    stdout (``| head -1``) ends quietly with 141.
    Used by ``insloc-hub``, ``insloc-train``, ``insloc-export`` and ``insloc-serve``.

    Example:
        >>> def main(argv=None):
        ...     return run_cli(build_parser(), argv)
    """
    args = parser.parse_args(argv)
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.INFO if long_running else logging.WARNING
    stamp = "%(asctime)s " if long_running else ""
    logging.basicConfig(level=level, format=stamp + "%(levelname)s %(name)s: %(message)s")
    name = " ".join(filter(None, (parser.prog, getattr(args, "command", None))))
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at interpreter exit
        return code
    except BrokenPipeError:
        # `insloc-hub info X --json | head -1`: stop quietly, as Unix tools do. Python's recipe (signal module
        # docs, "Note on SIGPIPE"): point stdout at devnull so that the flush at exit cannot fail again
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # what a shell reports for a tool that SIGPIPE ended
    except InsLocError as exc:
        print(f"{name}: error: {in_cli_words(str(exc), getattr(args, 'cli_words', {}))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        detail = str(exc) or getattr(args, "interrupted_hint", "")
        print(f"{name}: interrupted" + (f"; {detail}" if detail else ""), file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
