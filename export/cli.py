"""``insloc-export``: ONNX files with proven parity, TensorRT engines, Triton model repositories.

Subcommands: ``onnx``, ``inspect``, ``tensorrt``, ``triton``. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from insloc_hub.cli import ArgumentParser, run_cli


def cmd_onnx(args: argparse.Namespace) -> int:
    from insloc_hub.errors import ConfigError
    from insloc_hub.export.onnx_export import export_onnx

    if args.dynamic_size and (args.height or args.width):
        raise ConfigError("--dynamic-size contradicts --height/--width; give one or the other")
    result = export_onnx(
        args.name, args.output, task=args.task, opset=args.opset,
        batch=None if args.dynamic_batch else args.batch,
        height=None if args.dynamic_size else args.height, width=None if args.dynamic_size else args.width,
        half=args.half, revision=args.revision, verify=not args.no_verify,
        simplify=False if args.no_simplify else None, threads=args.threads,
    )
    meta = result.metadata
    print(f"wrote {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB) in {result.seconds:.1f} s")
    print(f"task: {result.task}; exporter: {meta['exporter']}; opset {meta['opset']}")
    for key in ("inputs", "outputs"):
        for t in meta[key]:
            print(f"  {key[:-1]:<6} {t['name']}: {t['dtype']} {t['shape']}")
    if result.parity is None:
        print("parity: NOT verified (--no-verify); run `insloc-export onnx` without it to check the graph")
    else:
        print(result.parity.summary())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from insloc_hub.export.metadata import format_metadata, read_metadata

    fields = read_metadata(args.file)
    print(json.dumps(fields, indent=2) if args.json else format_metadata(fields))
    return 0


def cmd_tensorrt(args: argparse.Namespace) -> int:
    from insloc_hub.export.tensorrt import build_engine

    result = build_engine(args.onnx, args.output, precision=args.precision, min_shape=args.min_shape,
                          opt_shape=args.opt_shape, max_shape=args.max_shape, workspace_gib=args.workspace,
                          timing_cache=args.timing_cache, verify=not args.no_verify)
    print(f"wrote {result.path} and {result.sidecar} (TensorRT {result.info['tensorrt_version']}, "
          f"{result.info['precision']}, {result.info['gpu']}, {result.info['build_seconds']} s)")
    print(result.parity.summary() if result.parity is not None else "parity: NOT verified (--no-verify)")
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from insloc_hub.export.triton import write_triton_repository

    folder = write_triton_repository(args.onnx, args.repository, args.name, max_batch_size=args.max_batch_size,
                                     instances=args.instances, kind=args.kind)
    print(f"wrote {folder / 'config.pbtxt'} and {folder / '1' / 'model.onnx'}")
    print(f"serve: tritonserver --model-repository {Path(args.repository).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="insloc-export", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("onnx", help="export a hub model to ONNX and check it against PyTorch")
    p.add_argument("name", help="hub name, alias, owner/repo[@revision] or local folder")
    p.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    p.add_argument("--task", choices=["features", "embedding", "detector"],
                   help="default: features for backbone folders, detector for detection folders")
    p.add_argument("--opset", type=int, choices=[17, 18], default=18)
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, help="fixed batch size (features/embedding)")
    batch.add_argument("--dynamic-batch", action="store_true", help="dynamic batch (the default)")
    p.add_argument("--height", type=int, help="fixed input height (with --width)")
    p.add_argument("--width", type=int, help="fixed input width (with --height)")
    p.add_argument("--dynamic-size", action="store_true", help="dynamic height and width (the default)")
    p.add_argument("--half", action="store_true", help="float16 weights and compute (features/embedding)")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")
    p.add_argument("--no-simplify", action="store_true", help="do not run onnxslim/onnxsim even when installed")
    p.add_argument("--threads", type=int, help="onnxruntime threads for the parity check")
    p.set_defaults(func=cmd_onnx)

    p = sub.add_parser("inspect", help="print the insloc metadata of an exported ONNX file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tensorrt", help="build a TensorRT engine from an exported ONNX file (needs a GPU)")
    p.add_argument("onnx", help="a file written by `insloc-export onnx`")
    p.add_argument("--output", "-o", required=True, help="engine file (.engine/.plan); a .json sidecar goes beside")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16")
    p.add_argument("--min-shape", help="profile minimum input shape, e.g. 1x3x224x224")
    p.add_argument("--opt-shape", help="profile optimum input shape")
    p.add_argument("--max-shape", help="profile maximum input shape")
    p.add_argument("--workspace", type=float, default=4.0, help="builder workspace limit in GiB")
    p.add_argument("--timing-cache", help="timing cache file (read and updated)")
    p.add_argument("--no-verify", action="store_true", help="skip the TensorRT-vs-onnxruntime check")
    p.set_defaults(func=cmd_tensorrt)

    p = sub.add_parser("triton", help="write a Triton Inference Server model repository")
    p.add_argument("onnx", help="a file written by `insloc-export onnx`")
    p.add_argument("--repository", "-r", required=True, help="model repository folder")
    p.add_argument("--name", help="model name in the repository (default: the file's stem)")
    p.add_argument("--max-batch-size", type=int, default=32, help="for dynamic-batch features/embedding graphs")
    p.add_argument("--instances", type=int, default=1, help="model instances per device")
    p.add_argument("--kind", choices=["auto", "cpu", "gpu"], default="auto", help="instance placement")
    p.set_defaults(func=cmd_triton)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
