"""skip_init: no initialisation inside the block, normal initialisation elsewhere and in other threads."""

import threading

import torch
from torch import nn

from insloc_hub.models.init_control import skip_init


def test_skips_inside_and_restores_after():
    original = nn.init.kaiming_uniform_
    with skip_init():
        assert nn.init.kaiming_uniform_ is not original
        t = torch.full((3, 3), 7.0)
        nn.init.kaiming_uniform_(t)
        assert torch.equal(t, torch.full((3, 3), 7.0))
    assert nn.init.kaiming_uniform_ is original


def test_other_threads_still_initialise():
    inside, done = threading.Event(), threading.Event()
    result = {}

    def other_thread():
        inside.wait()
        t = torch.zeros(64, 64)
        nn.init.normal_(t)
        result["std"] = float(t.std())
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with skip_init():
        inside.set()
        done.wait(10)
    worker.join()
    assert 0.5 < result["std"] < 1.5
