"""The pretraining loop: sampler, schedule, exact kill-and-resume, DDP on CPU, export into detectors."""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from insloc_hub import build_detector
from insloc_hub.errors import ConfigError
from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import from_pretrained
from insloc_hub.training.pretraining.engine import (
    PretrainConfig,
    ResumableDistributedSampler,
    batch_to_views,
    build_dataset,
    build_model,
    build_optimizer_and_schedule,
    composition_config,
    cosine_by_epoch,
    device_batches,
    export_checkpoint,
    resolve_config,
    set_schedule_epoch,
    train,
)
from insloc_hub.training.pretraining.pretrain_data import InsLocPretrainDataset, UnlabelledImages, collate_decoded
from insloc_hub.training.runtime.checkpoint import list_checkpoints, load_checkpoint
from insloc_hub.training.runtime.run import Stopped
from tests.photos import photo

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is fastest


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "colorwheel", "cat", "camera", "brick", "grass", "gravel", "moon", "coins", "horse")


def write_photos(folder: Path, count: int = 16, side: int = 96) -> Path:
    """``count`` real photographs (scikit-image samples, quadrant crops after the first 16) as JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = photo(PHOTOS[i % len(PHOTOS)])
        quadrant = i // len(PHOTOS)
        if quadrant:
            w, h = img.size
            x, y = ((quadrant - 1) % 2) * w // 2, ((quadrant - 1) // 2 % 2) * h // 2
            img = img.crop((x, y, x + w // 2, y + h // 2))
        img.thumbnail((side, side))
        img.save(folder / f"{i:03d}_{PHOTOS[i % len(PHOTOS)]}.jpg", quality=90)
    return folder


def tiny_config(data: Path, output: Path, **overrides) -> PretrainConfig:
    """3 epochs x 2 steps of 8 images at 64 px on the CPU, deterministic, a checkpoint every step."""
    values = dict(preset="tiny", data=str(data), output=str(output), batch_size=8, queue_size=16, epochs=3,
                  workers=0, device="cpu", deterministic=True, seed=3, checkpoint_every_steps=1, keep_checkpoints=0,
                  log_every=1)
    values.update(overrides)
    return resolve_config(values)


def cli_args(cfg: PretrainConfig) -> list[str]:
    args = ["pretrain"]
    for key, value in cfg.to_dict().items():
        if value is None or key == "preset":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def reference_run(photos, tmp_path_factory) -> Path:
    """An uninterrupted tiny run (6 steps), in process."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    train(tiny_config(photos, out))
    return out


# -- sampler and schedule ------------------------------------------------------------------------
def test_global_batches_do_not_depend_on_the_number_of_processes():
    one = ResumableDistributedSampler(10, 4, world_size=1, rank=0, seed=7)
    two = [ResumableDistributedSampler(10, 2, world_size=2, rank=r, seed=7) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(3)
    assert one.steps_per_epoch == 3 and len(one) == 12  # padded to whole global batches
    a = [i for _, i in one]
    b0, b1 = [[i for _, i in s] for s in two]
    merged = [x for step in range(3) for x in b0[2 * step:2 * step + 2] + b1[2 * step:2 * step + 2]]
    assert a == merged and sorted(set(a)) == list(range(10))
    assert all(e == 3 for e, _ in one)
    one.set_epoch(4)
    assert [i for _, i in one] != a  # reshuffled per epoch


def test_sampler_resumes_mid_epoch_without_drawing_anything():
    full = ResumableDistributedSampler(20, 4, seed=1)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableDistributedSampler(20, 4, seed=1)
    resumed.set_epoch(2)
    resumed.set_start_step(3)
    assert list(resumed) == order[12:] and len(resumed) == 8


def test_warmup_ramps_linearly_then_follows_the_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.03)
    sched = cosine_by_epoch(opt, 200, warmup_epochs=3)
    cosine = [0.03 * (1 + math.cos(math.pi * e / 200)) / 2 for e in range(5)]
    assert [set_schedule_epoch(sched, e) for e in range(5)] == pytest.approx(
        [cosine[0] / 4, cosine[1] * 2 / 4, cosine[2] * 3 / 4, cosine[3], cosine[4]])


def test_build_optimizer_official_sgd_or_adamw():
    model = torch.nn.Linear(2, 2)
    sgd, _ = build_optimizer_and_schedule(PretrainConfig(batch_size=16, queue_size=256), model)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.03 * 16 / 256, 0.9,
                                                                                         True, 1e-4)
    cfg = PretrainConfig(batch_size=16, queue_size=256, optimizer="adamw", lr=0.016, weight_decay=0.05,
                         warmup_epochs=5)
    adamw, schedule = build_optimizer_and_schedule(cfg, model)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["weight_decay"] == 0.05
    assert set_schedule_epoch(schedule, 0) == pytest.approx(0.001 / 6)
    with pytest.raises(ConfigError):
        PretrainConfig(optimizer="adam")


def test_cosine_per_epoch_without_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.03)
    sched = cosine_by_epoch(opt, 200)
    assert set_schedule_epoch(sched, 0) == pytest.approx(0.03) and opt.param_groups[0]["lr"] == pytest.approx(0.03)
    assert set_schedule_epoch(sched, 100) == pytest.approx(0.015)
    assert set_schedule_epoch(sched, 199) == pytest.approx(0.03 * (1 + math.cos(math.pi * 199 / 200)) / 2)
    assert set_schedule_epoch(sched, 3) == pytest.approx(0.03 * (1 + math.cos(math.pi * 3 / 200)) / 2)
    # a resumed run: a fresh optimizer and schedule restored from the state dicts give the same lr
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.03)
    opt2.load_state_dict(opt.state_dict())
    other = cosine_by_epoch(opt2, 200)
    other.load_state_dict(sched.state_dict())
    assert set_schedule_epoch(other, 50) == set_schedule_epoch(sched, 50)


def test_presets_and_scaled_lr():
    cfg = resolve_config({"preset": "r50-fpn-200ep", "data": "d", "output": "o"})
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.queue_size, cfg.key_momentum, cfg.temperature) == (
        "r50-fpn", 200, 256, 65536, 0.999, 0.2)
    assert cfg.nesterov and cfg.weight_decay == 1e-4 and cfg.scaled_lr == pytest.approx(0.03)
    cfg = resolve_config({"preset": "tiny", "batch_size": 32, "lr": 0.03, "queue_size": 256})
    assert cfg.arch == "tiny-fpn" and cfg.scaled_lr == pytest.approx(0.00375)  # explicit flags win


# -- the loop ------------------------------------------------------------------------------------
def test_run_folder_contents(reference_run):
    names = {p.name for p in reference_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "composition.png", "final"} <= names
    assert len([n for n in names if n.startswith("checkpoint_")]) == 6
    state = load_checkpoint(list_checkpoints(reference_run)[-1])
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (3, 0, 6)
    assert {"model", "optimizer", "scheduler", "rng", "config"} <= set(state)
    assert {"queue", "queue_ptr"} <= set(state["model"]) and any(k.startswith("encoder_k.") for k in state["model"])
    lines = (reference_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"loss_p5"' in lines[0]


def test_sigkill_and_resume_gives_bit_identical_weights(photos, reference_run, tmp_path):
    out = tmp_path / "killed"
    cfg = tiny_config(photos, out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "insloc_hub.training.cli", *cli_args(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "checkpoint_000000002.pt"
    deadline = time.monotonic() + 240
    try:
        while not target.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint at step 2 within the time limit"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # mid-run, possibly while the next checkpoint is being written
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists(), "the run finished before it could be killed"
    assert list_checkpoints(out)

    train(tiny_config(photos, out, resume="auto"))
    ref = load_checkpoint(list_checkpoints(reference_run)[-1])
    got = load_checkpoint(list_checkpoints(out)[-1])
    assert got["global_step"] == ref["global_step"] == 6
    for key, value in ref["model"].items():
        assert torch.equal(value, got["model"][key]), key
    for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    w_ref = load_file(str(reference_run / "final" / "model.safetensors"))
    w_got = load_file(str(out / "final" / "model.safetensors"))
    assert w_ref.keys() == w_got.keys() and all(torch.equal(w_ref[k], w_got[k]) for k in w_ref)
    # metrics of the killed steps after the checkpoint were dropped, then rewritten once
    assert [line.count('"step": ') for line in (out / "metrics.jsonl").read_text().splitlines()] == [1] * 6


def test_ctrl_c_saves_the_current_step_and_resume_gives_bit_identical_weights(photos, reference_run, tmp_path):
    """Ctrl-C mid-epoch, long after the last periodic checkpoint: the step in progress finishes and is saved."""
    out = tmp_path / "stopped"

    def interrupt_at_step_3(event, info):
        if event == "step" and info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    said = r"SIGINT at step 3/6, saved .*checkpoint_000000003\.pt; continue .*--resume auto"
    with pytest.raises(Stopped, match=said):
        train(tiny_config(photos, out, checkpoint_every_steps=0), callbacks=[interrupt_at_step_3])
    assert signal.getsignal(signal.SIGINT) is before  # the handler is the caller's again
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint_000000002.pt", "checkpoint_000000003.pt"]
    assert not (out / "final").exists()
    train(tiny_config(photos, out, checkpoint_every_steps=0, resume="auto"))
    w_ref = load_file(str(reference_run / "final" / "model.safetensors"))
    w_got = load_file(str(out / "final" / "model.safetensors"))
    assert w_ref.keys() == w_got.keys() and all(torch.equal(w_ref[k], w_got[k]) for k in w_ref)
    assert [line.count('"step": ') for line in (out / "metrics.jsonl").read_text().splitlines()] == [1] * 6


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_130(photos, tmp_path):
    """A scheduler's SIGTERM reaches the DataLoader workers too: they keep serving while the step is saved."""
    out = tmp_path / "preempted"
    cfg = tiny_config(photos, out, epochs=200, checkpoint_every_steps=0, workers=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "insloc_hub.training.cli", *cli_args(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no third step within the time limit"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"insloc-train pretrain: interrupted; SIGTERM at step (\d+)/400, saved .*checkpoint_0+\1\.pt; "
                        r"continue with the same command and --resume auto", last), last
    assert "killed by signal" not in err and "Traceback" not in err
    step = int(re.search(r"step (\d+)/", last).group(1))
    assert load_checkpoint(list_checkpoints(out)[-1])["global_step"] == step


def test_resume_auto_passes_over_a_corrupt_newest_checkpoint(photos, reference_run, tmp_path, caplog):
    """A damaged newest checkpoint (a crash mid-write elsewhere, a disk error) costs one step, not the run."""
    out = tmp_path / "damaged"
    shutil.copytree(reference_run, out, ignore=shutil.ignore_patterns("final", "checkpoint_00000000[56].pt"))
    (out / "checkpoint_000000005.pt").write_bytes(b"not a checkpoint at all")
    train(tiny_config(photos, out, resume="auto"))
    assert "skipping checkpoint" in caplog.text and "checkpoint_000000005.pt" in caplog.text
    w_ref = load_file(str(reference_run / "final" / "model.safetensors"))
    w_got = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(w_ref[k], w_got[k]) for k in w_ref)  # resumed from step 4: the same weights


def test_export_loads_in_from_pretrained_and_detectors_without_key_map(reference_run, tmp_path):
    backbone = from_pretrained(reference_run / "final")
    assert isinstance(backbone, InsLocBackbone) and backbone.config.parts == ("trunk", "fpn", "box_head")
    assert backbone.hub_config["provenance"]["method"] == "InsLoc"
    assert (reference_run / "final" / "metrics.jsonl").is_file()
    detector = build_detector("faster_rcnn_fpn", num_classes=3, pretrained=from_pretrained(reference_run / "final"))
    assert not detector.load_report.ignored
    trained = load_checkpoint(list_checkpoints(reference_run)[-1])["model"]
    det_state = detector.state_dict()
    assert torch.equal(det_state["roi_heads.box_head.fc1.weight"], trained["encoder_q.backbone.box_head.fc1.weight"])
    assert torch.equal(det_state["backbone.fpn.lateral.p2.conv.weight"],
                       trained["encoder_q.backbone.fpn.lateral.p2.conv.weight"])
    # export-weights of the newest checkpoint equals the run's own export
    folder = export_checkpoint(list_checkpoints(reference_run)[-1], tmp_path / "exported")
    a = load_file(str(folder / "model.safetensors"))
    b = load_file(str(reference_run / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_two_process_gloo_ddp_ranks_agree(photos, tmp_path):
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    dump.mkdir()
    cfg = tiny_config(photos, out, epochs=1, checkpoint_every_steps=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "training" / "ddp_worker.py"), str(dump), *cli_args(cfg)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert int(ranks[0]["step"]) == 2 and int(ranks[0]["queue_ptr"]) == 0  # 2 steps x 8 keys wrap K=16
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    state = load_checkpoint(list_checkpoints(out)[-1])
    assert state["world_size"] == 2 and state["global_step"] == 2
    assert (out / "final" / "model.safetensors").is_file()


def test_training_steps_lower_the_loss_on_photographs(photos, monkeypatch):
    """20 optimizer steps (the engine's SGD settings) on one batch of composed photographs, against a
    queue of real negatives (keys of 8 other photographs, held fixed), lower the summed loss."""
    torch.manual_seed(0)
    cfg = tiny_config(photos, photos / "unused", queue_size=8)
    model = build_model(cfg)
    dataset = InsLocPretrainDataset(UnlabelledImages(str(photos)), composition_config(cfg), seed=0)

    def batch(indices):
        samples = [dataset[(0, i)] for i in indices]
        return [torch.stack([s[k] for s in samples]) for k in ("q_img", "q_box", "k_img", "k_box")]

    q_img, q_box, k_img, k_box = batch(range(8))
    _, _, neg_img, neg_box = batch(range(8, 16))
    with torch.no_grad():
        negatives = model.encoder_k(neg_img, model._level_boxes(neg_box, None))  # [8, L, dim]
    model.queue.copy_(negatives.permute(1, 2, 0))
    monkeypatch.setattr(model, "_dequeue_and_enqueue", lambda keys: None)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    losses, accuracies = [], []
    for step in range(20):
        out = model(q_img, q_box, k_img, k_box, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
        accuracies.append(float(out["acc_p5"]))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert accuracies[-1] > accuracies[0]


def test_device_composition_gives_the_step_the_same_batches_with_and_without_the_prefetcher(tmp_path: Path) -> None:
    """The bytes-only workers + device composition path: on CPU the prefetcher changes nothing the step sees."""
    cfg = resolve_config({"preset": "tiny", "canvas": 64, "batch_size": 4, "queue_size": 8, "data": "d",
                          "output": "o"})
    images = UnlabelledImages(str(write_photos(tmp_path / "img", 8, 80)))
    sampler = ResumableDistributedSampler(len(images), 4, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(build_dataset(cfg, images, gpu_composition=True), batch_size=4,
                                         sampler=sampler, collate_fn=collate_decoded)
    prepare = functools.partial(batch_to_views, comp=composition_config(cfg), device=torch.device("cpu"),
                                channels_last=False)
    plain = [views for views, _ in device_batches(loader, prepare, torch.device("cpu"), prefetch=False)]
    prefetched = [views for views, waited in device_batches(loader, prepare, torch.device("cpu"), prefetch=True)]
    assert len(plain) == len(prefetched) == sampler.steps_per_epoch == 2
    for a, b in zip(plain, prefetched, strict=True):
        assert a[0].shape == (4, 3, 64, 64) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
