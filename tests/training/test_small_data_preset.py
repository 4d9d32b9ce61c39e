"""The small-data preset: its settings, the deviations it records, and the collapse it prevents."""

from __future__ import annotations

import pytest
import torch

from insloc_hub.pretrained import from_pretrained
from insloc_hub.training.pretraining.engine import build_model, deviations_from_official, resolve_config, train
from tests.training.test_engine import write_photos

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is fastest


@pytest.mark.parametrize("arch", ["tiny-fpn", "r18-fpn", "r50-fpn"])
def test_preset_works_with_every_fpn_size(arch):
    cfg = resolve_config({"preset": "small-data", "arch": arch, "data": "d", "output": "o"})
    assert cfg.arch == arch and cfg.method == "insloc" and cfg.batch_size == 16
    # the best combination of docs/pretraining.md ("Collapse"): projection BN, the batch's keys as the only
    # negatives, keys from the current weights, AdamW 3e-3 with warmup
    assert (cfg.projection_norm, cfg.inbatch_negatives, cfg.queue_negatives, cfg.key_momentum,
            cfg.symmetric_loss) == ("batch", True, False, 0.0, False)
    assert (cfg.optimizer, cfg.scaled_lr, cfg.weight_decay, cfg.warmup_epochs) == ("adamw", 0.003, 0.05, 5)
    assert cfg.queue_size % cfg.batch_size == 0 and cfg.temperature == 0.2 and cfg.box_jitter
    model = build_model(cfg)
    assert not model.symmetric_loss and not model.queue_negatives and model.predictor is None


def test_explicit_flags_still_override_the_preset():
    cfg = resolve_config({"preset": "small-data", "key_momentum": 0.99, "optimizer": "sgd"})
    assert cfg.key_momentum == 0.99 and cfg.optimizer == "sgd" and not cfg.queue_negatives


def test_official_recipe_has_no_deviations_and_the_preset_explains_each():
    assert deviations_from_official(resolve_config({"preset": "r50-fpn-200ep"})) == []
    deviations = deviations_from_official(resolve_config({"preset": "small-data"}))
    names = [d.split()[0] for d in deviations]
    assert names == ["batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs", "queue_size", "key_momentum",
                     "projection_norm", "inbatch_negatives", "queue_negatives"]
    assert all(": " in d for d in deviations), "every deviation of the preset carries its reason"
    # each reason names the ablation row or the measurement behind it
    by_name = dict(zip(names, deviations))
    for name in ("projection_norm", "inbatch_negatives", "queue_negatives", "key_momentum", "optimizer", "lr"):
        assert "`" in by_name[name], f"the reason for {name} names no ablation row"
    # a hand-made deviation is recorded, without a reason
    assert deviations_from_official(resolve_config({"temperature": 0.5})) == ["temperature 0.5 (official 0.2)"]


def _first_step_query_cosine(projection_norm: str) -> tuple[float, float]:
    """Mean pairwise query cosine before and after one SGD step (engine settings, lr 0.03 x 16 / 256)."""
    torch.manual_seed(0)
    cfg = resolve_config({"preset": "tiny", "batch_size": 16, "queue_size": 64, "projection_norm": projection_norm})
    model = build_model(cfg)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.scaled_lr,
                                momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 16, 3, 64, 64, generator=g)
    xy = torch.rand(2, 16, 2, generator=g) * 24
    boxes = torch.cat([xy, xy + 32 + torch.rand(2, 16, 2, generator=g) * 8], dim=-1)
    cosines = []
    for _ in range(2):
        out = model(images[0], boxes[0], images[1], boxes[1], generator=torch.Generator().manual_seed(0))
        cosines.append(float(out["cos_q"]))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    return cosines[0], cosines[1]


def test_projection_norm_prevents_the_one_step_collapse():
    before, after = _first_step_query_cosine(projection_norm="off")
    assert after > before + 0.1, (before, after)  # the official head: one small step makes the queries alike
    for norm in ("batch", "level"):
        before, after = _first_step_query_cosine(projection_norm=norm)
        assert abs(after) < 0.2, (norm, before, after)


def test_preset_run_records_its_deviations_in_the_card(tmp_path):
    photos = write_photos(tmp_path / "photos", count=16)
    out = tmp_path / "run"
    train(resolve_config({"preset": "small-data", "arch": "tiny-fpn", "canvas": 64, "data": str(photos),
                          "output": str(out), "workers": 0, "device": "cpu", "max_steps": 2, "log_every": 1}))
    provenance = from_pretrained(out / "final").hub_config["provenance"]
    for deviation in ("projection_norm batch (official off)", "queue_negatives False (official True)",
                      "key_momentum 0.0 (official 0.999)", "optimizer adamw (official sgd)"):
        assert any(d.startswith(deviation) for d in provenance["deviations_from_official"])
    assert "AdamW" in provenance["recipe"] and "warmup" in provenance["recipe"]
    card = (out / "final" / "README.md").read_text()
    section = card.split("### Deviations from the official recipe\n", 1)[1].split("\n\n", 1)[0]
    bullets = section.splitlines()
    assert len(bullets) == len(provenance["deviations_from_official"]) and all(b.startswith("- ") for b in bullets)
    assert any(b.startswith("- inbatch_negatives True (official False): ") for b in bullets)
    assert any(b.startswith("- queue_negatives False (official True): ") for b in bullets)


def test_checkpoints_written_before_the_new_fields_still_resume(tmp_path):
    from insloc_hub.training.runtime.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    photos = write_photos(tmp_path / "photos", count=8)
    values = {"preset": "tiny", "data": str(photos), "output": str(tmp_path / "run"), "batch_size": 8,
              "queue_size": 16, "workers": 0, "device": "cpu", "max_steps": 1}
    train(resolve_config(values))
    path = list_checkpoints(tmp_path / "run")[-1]
    state = load_checkpoint(path)
    for name in ("projection_norm", "inbatch_negatives", "embed_init", "tensorboard", "optimizer", "warmup_epochs",
                 "symmetric_loss", "predictor_hidden", "queue_negatives"):
        del state["config"][name]  # as written by an older version
    save_checkpoint(path, state)
    train(resolve_config({**values, "max_steps": 2, "resume": "auto"}))
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["global_step"] == 2
