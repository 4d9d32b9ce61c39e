"""``insloc-serve``: serve detectors and backbones over HTTP (/v1, a Hugging Face route per model, KServe v2).

    insloc-serve --model out/raccoon-detector --port 8000
    insloc-serve --model det=model.onnx --model insloc-r50 --max-batch-size 16
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from insloc_hub.cli import ArgumentParser, run_cli
from insloc_hub.errors import InsLocError
from insloc_hub.serve.settings import Settings, env_help


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="insloc-serve", description=__doc__.split("\n\n")[0],
        epilog="Every flag can also come from the environment variable named in its help line (INSLOC_SERVE_ and "
               "the flag's name in capitals, - as _). Flags win over the environment; an unknown INSLOC_SERVE_* "
               "variable is an error.")
    parser.add_argument("--model", dest="models", action="append", metavar="[NAME=]MODEL",
                        help="hub name, alias, folder or exported .onnx file; repeat to serve several (requests "
                             "then pick one with model=); NAME= sets the served name")
    parser.add_argument("--revision", help="Hub revision (branch, tag, commit) for hub names")
    parser.add_argument("--backend", choices=["auto", "torch", "onnxruntime"],
                        help="default auto: onnxruntime for .onnx files, torch for hub folders")
    parser.add_argument("--device", help="auto (default), cuda or cpu")
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="default 8000")
    parser.add_argument("--max-batch-size", type=int, help="largest device batch (default 16; 1 turns batching off)")
    parser.add_argument("--max-wait-ms", type=float, help="longest wait for a batch to fill (default 5)")
    parser.add_argument("--max-queue", type=int, help="images waiting per model before 503 (default 256)")
    parser.add_argument("--api-key-file", help="require this file's key (Authorization: Bearer KEY or X-API-Key)")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile on CUDA")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                        help="torch backend: auto (default) = bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--request-timeout-s", type=float,
                        help="deadline per request: 408 if its body has not arrived by then, 504 if its result "
                             "has not (default 30)")
    parser.add_argument("--max-body-bytes", type=int, help="largest request body (default 20 MiB)")
    parser.add_argument("--max-images", type=int, help="most images per request (default 16)")
    parser.add_argument("--max-pixels", type=int, help="most pixels per image (default 40,000,000)")
    parser.add_argument("--max-inflight-requests", type=int, help="requests in progress before 503 (default 128)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                        help="skip the warm-up pass before ready")
    parser.add_argument("--log-level", help="debug, info (default), warning")
    fields = {f.name for f in dataclasses.fields(Settings)}
    for action in parser._actions:  # each help line names its exact variable, from the one table settings reads
        if action.dest in fields:
            action.help = f"{action.help} [{env_help(action.dest)}]"
    parser.set_defaults(func=serve)
    return parser


def serve(args: argparse.Namespace) -> None:
    """Build the app from the flags (over the environment) and run it with uvicorn until Ctrl-C / SIGTERM."""
    settings = Settings.from_env(**{k: v for k, v in vars(args).items() if k != "func"})
    if not settings.models:
        raise InsLocError("no model to serve; pass --model NAME (hub name, folder or .onnx file) or set "
                          "INSLOC_SERVE_MODELS")
    import uvicorn

    from insloc_hub.serve.app import create_app

    logging.getLogger().setLevel(settings.log_level.upper())
    app = create_app(settings)
    service = app.state.service
    try:  # load, check names and warm up before listening: any failure ends here with one clear line
        service.prepare()
    except BaseException:
        service.device_thread.shutdown(wait=False, cancel_futures=True)
        raise
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=settings.request_timeout_s)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, long_running=True)


if __name__ == "__main__":
    sys.exit(main())
