"""The prepared GPU run of issue #13: the whole GPU table, each row against its fp32 eager baseline.

    bash benchmarks/gpu_check.sh OUTDIR [--photos DIR]   # one CUDA GPU, under 8 minutes on an H200
    bash benchmarks/gpu_check.sh OUTDIR --smoke          # the same code on the CPU, tiny sizes, < 2 min

Rows (baseline = the official recipe's way: fp32, NCHW, eager, per-parameter momentum update,
per-level loss loop; measured in the same run):

* InsLoc FPN pretraining, 256 px, batch 256: model step only (baseline, bf16 + channels-last,
  + torch.compile) and whole pipeline (workers read JPEG bytes -> nvJPEG decode on the GPU ->
  batched composition and augmentation on the GPU -> step), peak memory;
* C4 reconstruction: model step and whole pipeline;
* Faster R-CNN R50-FPN inference at 800x1216, batch 8, in-process; ResNet-50 features, 224 px;
* the host-synchronisation check of one pipeline step (``torch.cuda.set_sync_debug_mode`` warnings
  and the profiler's synchronising CUDA runtime calls; trace in OUTDIR);
* ``benchmarks/collapse_check.py --output OUTDIR/collapse.json`` when that script exists.

Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md and prints the table last. Needs only torch,
torchvision (numpy, PIL) and this repository: photos are generated at run time unless ``--photos``
is given; the hub's I/O packages (safetensors, huggingface_hub), unused here, are replaced by
stand-ins when they are not installed. Sections run in order of importance and are skipped, with a
note, once the time budget is spent.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.machinery
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTIONS = ("fpn", "c4", "detector", "resnet50", "collapse", "fpn-compiled", "resnet50-compiled")
# Synchronising CUDA runtime calls, as the profiler names them.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
              "cudaMemcpy2D ")


class _StandIn(types.ModuleType):
    """A module that is not installed and not needed here; any name in it is an inert class."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (RuntimeError,), {"__module__": self.__name__})


def bootstrap() -> list[str]:
    """Make ``insloc_hub`` importable from a bare checkout; returns the packages stood in for."""
    missing = []
    for name in ("safetensors", "safetensors.torch", "huggingface_hub", "tqdm"):
        try:
            importlib.import_module(name)
        except ImportError:
            module = _StandIn(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = module
            missing.append(name)
    if "safetensors.torch" in missing:
        sys.modules["safetensors"].torch = sys.modules["safetensors.torch"]  # type: ignore[attr-defined]
    import insloc_hub

    try:
        importlib.import_module("insloc_hub.training")
    except ModuleNotFoundError:  # not pip-installed: the subpackages live at the repository root
        insloc_hub.__path__.append(str(REPO))
    return missing


@dataclass
class Sizes:
    """Every size of the run; :meth:`smoke` is the CPU version of the same code."""

    device: str = "cuda"
    fpn_arch: str = "r50-fpn"
    c4_arch: str = "r50-c4"
    # pretraining step: the official run's canvas, batch and queue; timed and warm-up steps
    canvas: int = 256
    batch: int = 256
    queue: int = 65536
    steps: int = 10
    warmup: int = 3
    # whole pipeline (JPEG bytes -> step)
    workers: int = max(1, (os.cpu_count() or 2) - 2)
    pipeline_steps: int = 8
    photos: int = 512
    # inference
    detector_size: tuple[int, int] = (800, 1216)
    detector_batch: int = 8
    features_size: int = 224
    features_batch: int = 256
    compile: bool = True
    budget_s: float = 450.0

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(device="cpu", fpn_arch="tiny-fpn", c4_arch="tiny-c4", canvas=64, batch=4, queue=16, steps=1,
                   warmup=1, pipeline_steps=1, photos=12, workers=2, detector_size=(128, 160), detector_batch=1,
                   features_size=64, features_batch=2, compile=False, budget_s=100.0)


class Skipped(Exception):
    """A section that has nothing to run here (the message says why)."""


class Check:
    """Collects rows, notes and section timings; skips sections once the budget is spent."""

    def __init__(self, sizes: Sizes, out: Path) -> None:
        self.sizes, self.out = sizes, out
        self.start = time.perf_counter()
        self.rows: list[Any] = []
        self.sections: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.only: set[str] = set()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def section(self, name: str, fn: Callable[[], None], estimate_s: float = 0.0) -> None:
        """Run ``fn`` unless it was not selected or would not fit the budget (``estimate_s`` on a GPU)."""
        if self.only and name not in self.only:
            return
        estimate = estimate_s if self.sizes.device == "cuda" else 0.0
        if self.elapsed() + estimate > self.sizes.budget_s:
            self.sections[name] = {"status": f"skipped: time budget (needs about {estimate:.0f} s, "
                                             f"{self.sizes.budget_s - self.elapsed():.0f} s left); run it alone "
                                             f"with --sections {name}", "seconds": 0.0}
            print(f"[gpu_check] {name}: {self.sections[name]['status']}", flush=True)
            return
        print(f"[gpu_check] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            fn()
            status = "ok"
        except Skipped as why:
            status = f"skipped: {why}"
        except Exception as err:  # one failing section must not lose the others' figures
            status = f"failed: {type(err).__name__}: {err}"
            traceback.print_exc()
        finally:
            gc.collect()
            if self.sizes.device == "cuda":
                import torch

                torch.cuda.empty_cache()
        self.sections.setdefault(name, {}).update(status=status, seconds=round(time.perf_counter() - start, 1))
        print(f"[gpu_check] {name}: {status} ({time.perf_counter() - start:.0f} s)", flush=True)


# --------------------------------------------------------------------------------------------------
# Pretraining: model step and whole pipeline
# --------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    amp: bool
    channels_last: bool
    compile: bool = False


def _pretrain_config(sizes: Sizes, arch: str) -> Any:
    from insloc_hub.training.pretraining.engine import PretrainConfig

    return PretrainConfig(data="gpu-check", output="gpu-check", arch=arch, batch_size=sizes.batch,
                          canvas=sizes.canvas, queue_size=sizes.queue, workers=sizes.workers, device=sizes.device)


class Pipeline:
    """Workers read bytes; the main process decodes (nvJPEG on CUDA), composes and steps."""

    def __init__(self, cfg: Any, images: Any, device: Any, batch_backgrounds: bool = False) -> None:
        import torch
        from torch.utils.data import DataLoader, RandomSampler

        from insloc_hub.training.pretraining.engine import composition_config
        from insloc_hub.training.pretraining.pretrain_data import InsLocBytesDataset, collate_encoded

        self.comp = composition_config(cfg)
        self.device = device
        dataset = InsLocBytesDataset(images, self.comp, cfg.seed, batch_backgrounds=batch_backgrounds)
        # one long epoch drawn with replacement: a few hundred photos must not mean an epoch end (and
        # an idle loader) every other step
        sampler = RandomSampler(dataset, replacement=True, num_samples=cfg.batch_size * 100_000,
                                generator=torch.Generator().manual_seed(0))
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                 num_workers=cfg.workers, collate_fn=collate_encoded,
                                 pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                                 prefetch_factor=2 if cfg.workers > 0 else None)
        self.iterator = itertools.chain.from_iterable(itertools.repeat(self.loader))  # epoch after epoch

    def batch(self) -> Any:
        return next(self.iterator)

    def views(self, channels_last: bool, batch: Any = None) -> tuple[Any, ...]:
        """The views of ``batch`` (default: the next one), then its boxes on the host, as the trainer prepares them."""
        from insloc_hub.training.pretraining.engine import batch_to_views, host_boxes

        batch = self.batch() if batch is None else batch
        return batch_to_views(batch, self.comp, self.device, channels_last) + host_boxes(batch, self.comp)


def _step(setup: dict[str, Any], prepared: tuple[Any, ...], i: int) -> None:
    """One trainer step of ``prepared`` (views, then host boxes): the box jitter drawn on the host first."""
    import torch

    from insloc_hub.training.pretraining.engine import jitter_on_host, train_step

    q, q_box, k, k_box, *boxes = prepared
    generator = torch.Generator().manual_seed(i)
    jittered = jitter_on_host(setup["model"], boxes, generator, q.device)
    train_step(setup["model"], setup["optimizer"], (q, q_box, k, k_box), amp_dtype=setup["amp"],
               generator=generator, diagnostics=False, jittered=jittered)


def pretraining(check: Check, arch: str, label: str, images: Any, variants: list[Variant],
                pipeline_variant: str | None, *, with_baseline: bool = True) -> None:
    """Model-step rows for ``variants`` (the first is the baseline when ``with_baseline``), then the
    whole pipeline with ``pipeline_variant``."""
    cfg = _pretrain_config(check.sizes, arch)
    for variant in variants:
        _pretrain_variant(check, cfg, label, images, variant, baseline=with_baseline and variant is variants[0],
                          pipeline=variant.name == pipeline_variant)
        gc.collect()


def _pretrain_variant(check: Check, cfg: Any, label: str, images: Any, variant: Variant, *, baseline: bool,
                      pipeline: bool) -> None:
    import torch

    from benchmarks.runner import measure
    from benchmarks.train_throughput import make_setup, synthetic_views

    sizes, device = check.sizes, torch.device(check.sizes.device)
    setup = make_setup(cfg, device, amp=torch.bfloat16 if variant.amp else None, channels_last=variant.channels_last,
                       compile_model=variant.compile)
    views = synthetic_views(cfg, device, variant.channels_last)
    views += (views[1].cpu(), views[3].cpu())  # the boxes on the host too, for the box jitter
    counter = iter(range(10**9))
    check.rows.append(measure(f"{label} step, {sizes.canvas} px, batch {sizes.batch}", variant.name,
                              lambda: _step(setup, views, next(counter)), images=cfg.batch_size, repeats=sizes.steps,
                              warmup=sizes.warmup, baseline=baseline, device=sizes.device))
    if not pipeline:
        return
    pipe = Pipeline(cfg, images, device)
    for _ in range(sizes.warmup):  # workers start, the decoder warms up
        _step(setup, pipe.views(variant.channels_last), next(counter))

    def run_pipeline() -> None:
        for _ in range(sizes.pipeline_steps):
            _step(setup, pipe.views(variant.channels_last), next(counter))

    check.rows.append(measure(f"{label} whole pipeline (JPEG bytes -> step), {sizes.canvas} px, batch {sizes.batch}",
                              variant.name, run_pipeline, images=cfg.batch_size * sizes.pipeline_steps, repeats=3,
                              warmup=0, device=sizes.device, photos=len(images)))
    # the same, with the next batch decoded and composed on a side stream during the step
    from insloc_hub.training.pretraining.engine import host_boxes
    from insloc_hub.training.pretraining.pretrain_data import DevicePrefetcher, compose_encoded_batch

    def prepare(batch: Any) -> tuple[Any, ...]:
        q, qb, k, kb = compose_encoded_batch(batch, pipe.comp, device)
        if variant.channels_last:
            q, k = q.contiguous(memory_format=torch.channels_last), k.contiguous(memory_format=torch.channels_last)
        return (q, qb, k, kb) + host_boxes(batch, pipe.comp)

    prefetcher = DevicePrefetcher(iter(pipe.batch, None), prepare, device)

    def run_prefetched() -> None:
        for _ in range(sizes.pipeline_steps):
            _step(setup, next(prefetcher), next(counter))

    run_prefetched()  # warm-up
    check.rows.append(measure(f"{label} whole pipeline (JPEG bytes -> step), {sizes.canvas} px, batch {sizes.batch}",
                              f"{variant.name}, next batch prepared on a side stream", run_prefetched,
                              images=cfg.batch_size * sizes.pipeline_steps, repeats=3, warmup=0, device=sizes.device))
    check.rows.append(measure(f"{label} data only (JPEG bytes -> composed batch)", variant.name,
                              lambda: pipe.views(variant.channels_last), images=cfg.batch_size, repeats=sizes.steps,
                              warmup=1, device=sizes.device))
    if label.startswith("FPN"):
        sync_check(check, setup, pipe, variant, counter)


def sync_check(check: Check, setup: dict[str, Any], pipe: Pipeline, variant: Variant, counter: Any) -> None:
    """Count host synchronisations in whole-pipeline steps: sync-debug warnings and profiler calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = check.sizes.device == "cuda"
    result: dict[str, Any] = {"device": check.sizes.device}
    batches = [pipe.batch() for _ in range(2)]  # loaded first: waiting for workers is not the step's sync

    def steps() -> None:
        for batch in batches:
            _step(setup, pipe.views(variant.channels_last, batch), next(counter))

    if cuda:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                steps()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        messages = [str(w.message).split("\n")[0] for w in caught if "synchroniz" in str(w.message).lower()]
        result["sync_debug_warnings"] = len(messages)
        result["sync_debug_examples"] = sorted(set(messages))[:10]
        torch.cuda.synchronize()
        batches[:] = [pipe.batch() for _ in range(2)]
    else:
        result["sync_debug_warnings"] = None  # torch.cuda.set_sync_debug_mode needs CUDA
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        steps()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    counts = {e.key: e.count for e in events if any(e.key.startswith(name.strip()) and
                                                    (e.key == name.strip() or not name.endswith(" "))
                                                    for name in SYNC_CALLS)}
    result["profiler_sync_calls"] = counts
    result["profiler_sync_calls_total"] = int(sum(counts.values()))
    (check.out / "profile_pipeline_steps.txt").write_text(
        events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=60))
    trace = check.out / "trace_pipeline_steps.json.gz"  # chrome://tracing or perfetto read it
    prof.export_chrome_trace(str(trace))
    result["trace"] = trace.name
    result["note"] = ("2 whole-pipeline steps (decode on the device, composition, box jitter on the host, model "
                      "step), batches already loaded; the final torch.cuda.synchronize of the profiled block is "
                      "counted once")
    check.sections.setdefault("sync", {}).update(result)


# --------------------------------------------------------------------------------------------------
# Inference: Faster R-CNN R50-FPN and ResNet-50 features
# --------------------------------------------------------------------------------------------------
def detector_inference(check: Check) -> None:
    import torch

    from benchmarks.runner import measure
    from insloc_hub import build_detector

    sizes, device = check.sizes, torch.device(check.sizes.device)
    h, w = sizes.detector_size
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)).to(device)
              for i in range(sizes.detector_batch)]
    workload = f"Faster R-CNN R50-FPN inference, {h}x{w}, batch {sizes.detector_batch}"
    # smoke: the test-time resize kept at the tiny input size and fewer proposals, same code otherwise
    options = {} if device.type == "cuda" else {"min_size": h, "max_size": w, "rpn_pre_nms_top_n_test": 100,
                                                "rpn_post_nms_top_n_test": 50}
    for name, amp, channels_last in (("fp32 eager (baseline)", False, False), ("bf16 + channels-last", True, True)):
        torch.manual_seed(0)
        model = build_detector("faster_rcnn_fpn", 91, preset="r50-fpn", **options).to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)

        def run(model: Any = model, amp: bool = amp) -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model(images)

        check.rows.append(measure(workload, name, run, images=len(images), repeats=sizes.steps, warmup=sizes.warmup,
                                  baseline=not amp, device=sizes.device))
        del model


def resnet_features(check: Check, compiled: bool) -> None:
    import torch
    import torchvision

    from benchmarks.runner import measure

    sizes, device = check.sizes, torch.device(check.sizes.device)
    s, b = sizes.features_size, sizes.features_batch
    x = torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device)
    workload = f"ResNet-50 features, {s} px, batch {b}"
    variants = [("fp32 eager (baseline)", False, False), ("bf16 + channels-last", True, False)]
    if compiled:
        variants = [variants[0], ("bf16 + channels-last + torch.compile", True, True)]
    for name, fast, compile_model in variants:
        torch.manual_seed(0)
        model = torchvision.models.resnet50()
        model.fc = torch.nn.Identity()
        model = model.to(device).eval()
        inputs = x
        if fast:
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        if compile_model:
            model = torch.compile(model)

        def run(model: Any = model, inputs: Any = inputs, fast: bool = fast) -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                model(inputs)

        check.rows.append(measure(workload, name, run, images=b, repeats=sizes.steps, warmup=sizes.warmup,
                                  baseline=not fast, device=sizes.device))
        del model


def collapse_check(check: Check, smoke: bool) -> None:
    script = REPO / "benchmarks" / "collapse_check.py"
    if not script.is_file():
        raise Skipped("benchmarks/collapse_check.py does not exist in this checkout")
    # through bootstrap(), so the script imports insloc_hub from a bare checkout as this one does
    launcher = [sys.executable, "-c", "import runpy, sys; sys.path.insert(0, sys.argv[1]); "
                "from benchmarks.gpu_check import bootstrap; bootstrap(); sys.argv = sys.argv[2:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')", str(REPO), str(script)]
    command = [*launcher, "--output", str(check.out / "collapse.json")]
    if smoke:  # the smoke run stays short: only a collapse check that has a smoke mode of its own
        usage = subprocess.run([*launcher, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO).stdout
        if "--smoke" not in usage:
            raise Skipped("collapse_check.py has no --smoke mode; it runs in the GPU run only")
        command.append("--smoke")
    # room for the smoke version (6 tiny steps) on a slow or loaded CPU, whatever the budget left
    timeout = max(120.0 if smoke else 30.0, check.sizes.budget_s + 60 - check.elapsed())
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    check.sections.setdefault("collapse", {}).update(
        command=f"python benchmarks/collapse_check.py --output {check.out / 'collapse.json'}"
        + (" --smoke" if smoke else ""), returncode=done.returncode, output_tail=(done.stdout + done.stderr)[-2000:])
    if done.returncode != 0:
        raise RuntimeError(f"collapse_check.py exited with {done.returncode}")


# --------------------------------------------------------------------------------------------------
# Goals, report
# --------------------------------------------------------------------------------------------------
GOALS = (  # (workload prefix, img/s goal, peak GiB limit, the wording)
    ("FPN whole pipeline", 2500, 40.0, "InsLoc FPN pretraining, 256 px, batch 256, whole pipeline: >= 2,500 img/s, "
                                       "peak <= 40 GiB"),
    ("FPN step", 2500, None, "the same, model step only: >= 2,500 img/s"),
    ("C4 whole pipeline", 2500, None, "C4 reconstruction, whole pipeline: >= 2,500 img/s"),
    ("Faster R-CNN", 176, None, "Faster R-CNN R50-FPN inference, 800 px, batch 8: >= 176 img/s"),
    ("ResNet-50 features", 15000, None, "ResNet-50 features, 224 px: >= 15,000 img/s"),
)


def goals(rows: list[Any], smoke: bool) -> list[dict[str, Any]]:
    result = []
    for prefix, target, peak_gib, wording in GOALS:
        candidates = [r for r in rows if r.workload.startswith(prefix) and not r.baseline]
        if not candidates:
            result.append({"goal": wording, "status": "not measured"})
            continue
        best = max(candidates, key=lambda r: r.images_per_second)
        peak = (best.peak_memory_mb or 0) / 1024
        met = best.images_per_second >= target and (peak_gib is None or peak <= peak_gib)
        status = "n/a (smoke run on the CPU)" if smoke else ("MET" if met else "NOT MET")
        result.append({"goal": wording, "best": f"{best.variant}: {best.images_per_second:,.0f} img/s"
                       + (f", peak {peak:.1f} GiB" if peak_gib is not None else ""), "status": status})
    return result


def report(check: Check, smoke: bool, stood_in: list[str]) -> str:
    import torch

    from benchmarks.runner import format_table, ratios

    ratio = ratios(check.rows)
    goal_rows = goals(check.rows, smoke)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke else "cpu",
           "smoke": smoke, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "seconds": round(check.elapsed(), 1), "stand_ins": stood_in, "sizes": asdict(check.sizes)}
    data = {"environment": env, "rows": [{**asdict(r), "images_per_second": r.images_per_second,
                                          "ratio": ratio[id(r)]} for r in check.rows],
            "goals": goal_rows, "sections": check.sections, "notes": check.notes}
    (check.out / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    lines = [format_table(check.rows, title=f"gpu_check ({'SMOKE, CPU' if smoke else env['device']}, torch "
                                            f"{env['torch']}, {env['date_utc']} UTC, {env['seconds']:.0f} s)"),
             "", "| goal (issue #13) | best measured | status |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g.get('best', '-')} | {g['status']} |" for g in goal_rows]
    sync = check.sections.get("sync", {})
    if sync:
        lines += ["", f"host synchronisation in 2 pipeline steps: sync-debug warnings "
                      f"{sync.get('sync_debug_warnings')}, profiler sync calls {sync.get('profiler_sync_calls_total')} "
                      f"{sync.get('profiler_sync_calls', {})}"]
    lines += ["", "sections: " + "; ".join(f"{k} {v.get('status', '')} ({v.get('seconds', 0)} s)"
                                             for k, v in check.sections.items() if "status" in v)]
    text = "\n".join(lines) + "\n"
    (check.out / "gpu_check.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder for gpu_check.json, gpu_check.md, the profile and the trace")
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU, tiny sizes (< 2 minutes)")
    parser.add_argument("--photos", default=None, help="folder of JPEG photos (default: generated here)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget in seconds (default 450 on a GPU): a section that would not fit is skipped")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)

    stood_in = bootstrap()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False). This check measures "
              "the GPU table and needs one GPU; use --smoke to run the same code on the CPU.", file=sys.stderr)
        return 2
    sizes = Sizes.smoke() if args.smoke else Sizes()
    if args.no_compile:
        sizes = replace(sizes, compile=False)
    if args.budget_s is not None:
        sizes = replace(sizes, budget_s=args.budget_s)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(sizes, out)
    if args.sections:
        check.only = {name.strip() for name in args.sections.split(",") if name.strip()}
        unknown = check.only - set(SECTIONS)
        if unknown:
            print(f"gpu_check: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}",
                  file=sys.stderr)
            return 2
    if args.smoke:
        torch.set_num_threads(1)
    else:
        torch.backends.cudnn.benchmark = True

    from benchmarks.photos import photo_files, write_synthetic_photos
    from insloc_hub.training.pretraining.pretrain_data import UnlabelledImages

    with tempfile.TemporaryDirectory() as tmp:
        if args.photos:
            folder = Path(args.photos)
        else:
            start = time.perf_counter()
            folder = write_synthetic_photos(Path(tmp) / "photos", sizes.photos, processes=os.cpu_count() or 1)
            check.notes.append(f"{sizes.photos} synthetic JPEG photos generated in {time.perf_counter() - start:.0f} s")
        images = UnlabelledImages([str(p) for p in photo_files(folder)])
        check.notes.append(f"photos: {args.photos or 'synthetic'} ({len(images)} JPEGs)")
        base = Variant("fp32 eager (baseline)", amp=False, channels_last=False)
        fast = Variant("bf16 + channels-last", amp=True, channels_last=True)
        compiled = replace(fast, name="bf16 + channels-last + torch.compile", compile=True)
        # in order of importance; estimates are H200 seconds (compile alone takes about 94 s for FPN)
        check.section("fpn", lambda: pretraining(check, sizes.fpn_arch, "FPN", images, [base, fast], fast.name), 150)
        check.section("c4", lambda: pretraining(check, sizes.c4_arch, "C4", images, [base, fast], fast.name), 90)
        check.section("detector", lambda: detector_inference(check), 40)
        check.section("resnet50", lambda: resnet_features(check, compiled=False), 30)
        check.section("collapse", lambda: collapse_check(check, args.smoke), 60)
        if sizes.compile:
            check.section("fpn-compiled", lambda: pretraining(check, sizes.fpn_arch, "FPN", images, [compiled],
                                                              compiled.name, with_baseline=False), 180)
            check.section("resnet50-compiled", lambda: resnet_features(check, compiled=True), 60)
    text = report(check, args.smoke, stood_in)
    print()
    print(text, end="", flush=True)
    failed = [k for k, v in check.sections.items() if str(v.get("status", "")).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
