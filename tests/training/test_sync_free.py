"""The pretraining step reads nothing back from the device (issue #13), checked on the CPU.

On a GPU a step that reads a tensor on the host (``int(t)``, ``.item()``, ``.tolist()``, ``bool(t)``) or runs an op
whose output size depends on the data (``nonzero``, boolean-mask indexing, ``unique``, NMS) waits for every queued
kernel. Those calls look the same on the CPU, so :class:`HostReads` records them there: a dispatch mode sees the
aten ops (below autograd, backward included) and a function mode the tensor methods that read memory directly.
``benchmarks/gpu_check.py`` counts the synchronisations themselves on CUDA with the profiler.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from insloc_hub.training.pretraining.engine import (
    batch_to_views,
    build_dataset,
    build_model,
    build_optimizer_and_schedule,
    composition_config,
    host_boxes,
    jitter_on_host,
    resolve_config,
    train_step,
)
from insloc_hub.training.pretraining.pretrain_data import UnlabelledImages, collate_decoded
from tests.training.test_engine import write_photos

pytestmark = pytest.mark.usefixtures("one_thread")

#: aten / torchvision ops that read a value on the host or whose output size depends on the data
DATA_DEPENDENT_OPS = frozenset({
    "aten._local_scalar_dense",  # int(t), float(t), bool(t), t.item()
    "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.argwhere", "aten.masked_select",
    "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.unique_dim_consecutive",
    "aten.bincount", "torchvision.nms",
})
#: indexing ops that are data dependent with a boolean mask among their indices
MASK_INDEXING_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
#: tensor methods that read memory on the host without dispatching an aten op on the CPU
HOST_METHODS = frozenset({"tolist", "numpy", "item", "cpu", "__int__", "__float__", "__bool__", "__index__"})


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class HostReads:
    """Context manager recording every host read and data-dependent op in ``events`` (op names, in order).

    ``host_tensor(t)``: true for tensors that stay on the host in a GPU run too, whose reads are left out.
    """

    def __init__(self, host_tensor: Callable[[torch.Tensor], bool] = lambda t: False) -> None:
        self.events: list[str] = []
        recorder = self

        def on_host(args: tuple[Any, ...]) -> bool:
            return bool(args) and isinstance(args[0], torch.Tensor) and host_tensor(args[0])

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                kwargs = kwargs or {}
                name = str(func.overloadpacket)
                indices = args[1] if name in MASK_INDEXING_OPS and len(args) > 1 else ()
                if on_host(args):
                    pass
                elif (name in DATA_DEPENDENT_OPS or any(_is_mask(i) for i in indices or ())
                        or (name == "aten.repeat_interleave" and kwargs.get("output_size") is None)):
                    recorder.events.append(str(func))
                return func(*args, **kwargs)

        class Methods(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                if getattr(func, "__name__", None) in HOST_METHODS and not on_host(args):
                    recorder.events.append(f"Tensor.{func.__name__}")
                return func(*args, **(kwargs or {}))

        self._modes = (Methods(), Ops())

    def __enter__(self) -> HostReads:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def test_the_recorder_catches_host_reads_and_data_dependent_ops() -> None:
    x = torch.tensor([0.5, -1.0, 2.0, 2.0])
    cases = {
        "int": lambda: int(x[0] > 0),
        "float": lambda: float(x.sum()),
        "item": lambda: x.max().item(),
        "bool": lambda: bool(x.any()),
        "tolist": lambda: x.tolist(),
        "numpy": lambda: x.numpy(),
        "nonzero": lambda: torch.nonzero(x),
        "mask": lambda: x[x > 0],
        "mask assignment": lambda: x.clone().__setitem__(x > 0, 0.0),
        "unique": lambda: torch.unique(x),
        "bincount": lambda: torch.bincount(x.long().clamp(0)),
        "repeat_interleave": lambda: torch.repeat_interleave(torch.tensor([1, 2])),
        "nms": lambda: torchvision.ops.nms(torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]]), x[:2], 0.5),
    }
    for name, call in cases.items():
        with HostReads() as reads:
            call()
        assert reads.events, f"{name} was not recorded"
    with HostReads() as reads:  # sync-free counterparts
        x.masked_fill(x > 0, 0.0), torch.where(x > 0, x, 0.0), x.argmax(), x.topk(2), x[torch.tensor([0, 2])]
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([1, 2]), output_size=3)
    assert reads.events == []


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> UnlabelledImages:
    return UnlabelledImages(str(write_photos(tmp_path_factory.mktemp("photos"), 2, 80)))


def _setup(images: UnlabelledImages, gpu_composition: bool, **overrides: Any) -> tuple[Any, ...]:
    """A tiny model at 64 px (tiny-fpn unless overridden), its optimizer and a loader batch of 2 images."""
    cfg = resolve_config({"preset": "tiny", "canvas": 64, "batch_size": 2, "queue_size": 4, "data": "d",
                          "output": "o", **overrides})
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer, _ = build_optimizer_and_schedule(cfg, model)
    dataset = build_dataset(cfg, images, gpu_composition)
    samples = [dataset[(0, i)] for i in range(2)]
    batch = collate_decoded(samples) if gpu_composition else torch.utils.data.default_collate(samples)
    return cfg, model, optimizer, batch


@pytest.mark.parametrize("gpu_composition", [False, True], ids=["cpu-composed", "device-composer"])
@pytest.mark.parametrize("overrides", [{}, {"preset": "small-data", "arch": "tiny-fpn", "symmetric_loss": True,
                                             "predictor_hidden": 16}, {"arch": "tiny-c4"}, {"method": "moco"}],
                         ids=["official", "small-data+symmetric+predictor", "c4", "moco"])
def test_a_pretraining_step_without_diagnostics_reads_nothing_from_the_device(
        images: UnlabelledImages, gpu_composition: bool, overrides: dict[str, Any]) -> None:
    """``train_step`` as the trainer runs it (jitter drawn on the host first), on both data paths."""
    cfg, model, optimizer, batch = _setup(images, gpu_composition, **overrides)
    device, comp = torch.device("cpu"), composition_config(cfg)
    views = batch_to_views(batch, comp, device, channels_last=False)
    generator = torch.Generator().manual_seed(1)
    jittered = None
    if cfg.method == "insloc":
        boxes = host_boxes(batch, comp)
        assert torch.equal(boxes[0], views[1]) and torch.equal(boxes[1], views[3])  # what the step is given
        jittered = jitter_on_host(model, boxes, generator, device)
        assert (jittered[1] is not None) == cfg.symmetric_loss
    else:
        views = (views[0], None, views[2], None)
    before = [p.detach().clone() for p in model.parameters()]

    def step_counter(t: torch.Tensor) -> bool:
        """Adam(W)'s step counts: torch keeps them on the host unless ``capturable``/``fused`` (then it reads none)."""
        return any(t is state.get("step") for state in optimizer.state.values())

    with HostReads(step_counter) as reads:
        out = train_step(model, optimizer, views, generator=generator, diagnostics=False, jittered=jittered)
    assert reads.events == []
    assert torch.isfinite(out["loss"]) and int(model.queue_ptr) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # a real step
    train_step(model, optimizer, views, generator=generator, diagnostics=True, jittered=jittered)  # log steps may read
    assert int(model.queue_ptr) == 0  # K = 4: the pointer wrapped around on the device


def test_a_deliberate_host_read_inside_the_step_is_caught(images: UnlabelledImages,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The enqueue as it was before issue #13 (``int(queue_ptr)``): the recorder finds that read, and nothing else."""
    cfg, model, optimizer, batch = _setup(images, False)
    comp = composition_config(cfg)
    views = batch_to_views(batch, comp, torch.device("cpu"), channels_last=False)
    generator = torch.Generator().manual_seed(1)
    jittered = jitter_on_host(model, host_boxes(batch, comp), generator, torch.device("cpu"))
    enqueue = model._dequeue_and_enqueue

    def reading_enqueue(keys: torch.Tensor) -> None:
        int(model.queue_ptr)
        enqueue(keys)

    monkeypatch.setattr(model, "_dequeue_and_enqueue", reading_enqueue)
    with HostReads() as reads:
        train_step(model, optimizer, views, generator=generator, diagnostics=False, jittered=jittered)
    assert reads.events == ["Tensor.__int__", "aten._local_scalar_dense.default"]


def test_the_box_jitter_inside_the_step_would_read_from_the_device(images: UnlabelledImages) -> None:
    """Why the trainer draws the jitter on the host: drawn by the model (on the step's device), its candidate
    selection and NMS are data dependent. Same numbers either way."""
    cfg, model, optimizer, batch = _setup(images, False)
    views = batch_to_views(batch, composition_config(cfg), torch.device("cpu"), channels_last=False)
    twin = copy.deepcopy(model)
    with HostReads() as reads:
        inside = twin(*views, generator=torch.Generator().manual_seed(4), diagnostics=False)
    assert "torchvision.nms.default" in reads.events and "aten.nonzero.default" in reads.events
    jittered = jitter_on_host(model, host_boxes(batch, composition_config(cfg)), torch.Generator().manual_seed(4),
                              torch.device("cpu"))
    outside = model(*views, generator=torch.Generator().manual_seed(4), diagnostics=False, jittered=jittered)
    assert torch.equal(inside["loss"], outside["loss"])


def test_the_model_refuses_a_missing_jittered_box(images: UnlabelledImages) -> None:
    cfg, model, optimizer, batch = _setup(images, False)
    views = batch_to_views(batch, composition_config(cfg), torch.device("cpu"), channels_last=False)
    with pytest.raises(ValueError, match="no jittered boxes"):
        model(*views, diagnostics=False, jittered=(None, None))


def test_host_reads_sees_the_backward_pass() -> None:
    """Ops of the backward pass run under the modes too (a data-dependent op in a backward formula counts)."""
    class Reads(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return grad * float(grad.sum())

    x = torch.ones(3, requires_grad=True)
    with HostReads() as reads:
        Reads.apply(x).sum().backward()
    assert reads.events

