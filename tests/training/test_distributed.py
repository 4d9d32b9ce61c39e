"""Distributed helpers without a process group, and torchrun environment parsing."""

from __future__ import annotations

import pytest
import torch

from insloc_hub.errors import ConfigError
from insloc_hub.training.runtime import distributed as D


def test_single_process_defaults():
    info = D.init_distributed("cpu", env={})
    assert (info.rank, info.world_size, info.backend, info.device.type) == (0, 1, None, "cpu")
    assert D.get_rank() == 0 and D.get_world_size() == 1 and info.is_main
    t = torch.arange(6).view(3, 2)
    assert D.all_gather_tensor(t) is t
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()
    D.cleanup()


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    launch = D.detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 8, 1, "torchrun")
    assert launch.master_port == 1234
    assert D.detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}).launcher == "none"  # srun torchrun


def test_bad_env_values_are_config_errors():
    with pytest.raises(ConfigError, match="RANK"):
        D.detect_launch_env({"RANK": "x", "WORLD_SIZE": "2"})
