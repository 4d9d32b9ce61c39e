"""Run ``insloc-train`` under torchrun and dump each rank's final model state (for test_engine.py).

Usage: ``torchrun --standalone --nproc-per-node 2 tests/training/ddp_worker.py DUMP_DIR pretrain ...``;
rank ``r`` writes ``DUMP_DIR/rank{r}.pt`` with its parameters, queue and queue pointer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from insloc_hub.training import cli
from insloc_hub.training.pretraining import engine, pretrain
from insloc_hub.training.runtime.distributed import get_rank


def main() -> int:
    dump_dir = Path(sys.argv[1])
    original = engine.train

    def dump(event: str, info: dict) -> None:
        if event == "end":
            model = info["model"]
            state = {f"param.{k}": v.detach().clone() for k, v in model.named_parameters()}
            state["queue"] = model.queue.clone()
            state["queue_ptr"] = model.queue_ptr.clone()
            state["step"] = torch.tensor(info["step"])
            torch.save(state, dump_dir / f"rank{get_rank()}.pt")

    pretrain.train = lambda cfg: original(cfg, callbacks=[dump])
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
