"""The InsLoc model: queues, loss, momentum update, gradients, box jitter placement, export names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from insloc_hub.errors import ConfigError
from insloc_hub.models import InsLocBackbone
from insloc_hub.training.pretraining import insloc as insloc_module
from insloc_hub.training.pretraining.boxaug import BoxJitter
from insloc_hub.training.pretraining.insloc import InsLoc, info_nce_per_level
from insloc_hub.training.pretraining.moco import MoCo

B, S = 4, 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is fastest


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 3, S, S, generator=g)
    k = torch.randn(B, 3, S, S, generator=g)
    q_box = torch.tensor([[4.0, 6.0, 44.0, 50.0], [10.0, 2.0, 60.0, 40.0], [0.0, 0.0, 33.0, 63.0], [20, 20, 62, 58]])
    k_box = torch.tensor([[8.0, 8.0, 40.0, 56.0], [1.0, 12.0, 50.0, 60.0], [30.0, 4.0, 63.0, 44.0], [5, 5, 45, 35]])
    return q, q_box, k, k_box


@pytest.fixture(scope="module")
def tiny() -> InsLoc:
    torch.manual_seed(0)
    return InsLoc("tiny-fpn", K=16, canvas=S)


def test_queues_are_normalised_buffers_with_one_pointer(tiny):
    assert tiny.queue.shape == (4, 128, 16)
    assert torch.allclose(tiny.queue.norm(dim=1), torch.ones(4, 16), atol=1e-5)
    names = dict(tiny.named_buffers())
    assert "queue" in names and "queue_ptr" in names and tiny.levels == ("p2", "p3", "p4", "p5")


def test_enqueue_writes_all_levels_and_the_pointer_wraps():
    model = InsLoc("tiny-fpn", K=8, canvas=S)
    keys = [F.normalize(torch.randn(4, 4, 128), dim=-1) for _ in range(3)]
    model._dequeue_and_enqueue(keys[0])
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :, :4], keys[0].permute(1, 2, 0))
    model._dequeue_and_enqueue(keys[1])
    assert int(model.queue_ptr) == 0  # 8 % 8: wrapped
    assert torch.equal(model.queue[:, :, 4:], keys[1].permute(1, 2, 0))
    model._dequeue_and_enqueue(keys[2])  # overwrites the oldest block
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :, :4], keys[2].permute(1, 2, 0))
    assert torch.equal(model.queue[:, :, 4:], keys[1].permute(1, 2, 0))
    with pytest.raises(ConfigError, match="multiple of the global batch size 3"):
        model._dequeue_and_enqueue(F.normalize(torch.randn(3, 4, 128), dim=-1))


def _official_loss_loop(q, k, queue, temperature):
    """The official per-level loop (insloc_fpn.py: einsum('nc,nc->n'), einsum('nc,ck->nk')), for reference."""
    losses, accuracies = [], []
    for level in range(q.shape[0]):
        l_pos = torch.einsum("nc,nc->n", q[level], k[level]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q[level], queue[level])
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        losses.append(F.cross_entropy(logits, labels))
        accuracies.append((logits.argmax(dim=1) == 0).float().mean() * 100.0)
    return torch.stack(losses), torch.stack(accuracies)


def test_info_nce_on_hand_checkable_inputs():
    # q == k == e_0, negatives e_1..e_K (orthogonal): l_pos = 1, l_neg = 0, so with T = 0.2
    # logits = [5, 0, ..., 0] and CE = log(1 + K * exp(-5)) for every image of every level.
    dim, num_neg, levels, batch = 16, 8, 4, 3
    eye = torch.eye(dim)
    q = eye[0].expand(levels, batch, dim).contiguous()
    queue = eye[1:num_neg + 1].T.expand(levels, dim, num_neg).contiguous()
    losses, acc = info_nce_per_level(q, q.clone(), queue, 0.2)
    expected = math.log(1 + num_neg * math.exp(-5.0))
    assert torch.allclose(losses, torch.full((levels,), expected), atol=1e-6)
    assert torch.equal(acc, torch.full((levels,), 100.0))
    # one negative equal to the query: logits [5, 5, 0, ..., 0], CE = log(2 + (K - 1) exp(-5))
    queue2 = queue.clone()
    queue2[:, :, 0] = eye[0]
    losses2, _ = info_nce_per_level(q, q.clone(), queue2, 0.2)
    expected2 = math.log(1 + math.exp(0.0) + (num_neg - 1) * math.exp(-5.0))
    assert torch.allclose(losses2, torch.full((levels,), expected2), atol=1e-6)


def test_batched_loss_equals_the_official_loop():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(4, 6, 32, generator=g), dim=-1)
    k = F.normalize(torch.randn(4, 6, 32, generator=g), dim=-1)
    queue = F.normalize(torch.randn(4, 32, 24, generator=g), dim=1)
    a = info_nce_per_level(q, k, queue, 0.2)
    b = _official_loss_loop(q, k, queue, 0.2)
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.equal(a[1], b[1])


def test_inbatch_negatives_add_the_other_keys_of_the_batch():
    g = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(2, 5, 16, generator=g), dim=-1)
    k = F.normalize(torch.randn(2, 5, 16, generator=g), dim=-1)
    queue = F.normalize(torch.randn(2, 16, 10, generator=g), dim=1)
    losses, _ = info_nce_per_level(q, k, queue, 0.2, inbatch_negatives=True)
    # the same loss as the plain one with the other keys of the batch appended to each query's negatives
    expected = []
    for level in range(2):
        per_image = []
        for i in range(5):
            negatives = torch.cat([queue[level], k[level][torch.arange(5) != i].T], dim=1)
            logits = torch.cat([(q[level, i] * k[level, i]).sum().view(1), q[level, i] @ negatives]) / 0.2
            per_image.append(F.cross_entropy(logits.view(1, -1), torch.zeros(1, dtype=torch.long)))
        expected.append(torch.stack(per_image).mean())
    assert torch.allclose(losses, torch.stack(expected), atol=1e-5)


def test_without_queue_negatives_only_the_batch_keys_are_negatives():
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(2, 5, 16, generator=g), dim=-1)
    k = F.normalize(torch.randn(2, 5, 16, generator=g), dim=-1)
    losses, _ = info_nce_per_level(q, k, None, 0.2, inbatch_negatives=True)
    logits = torch.bmm(q, k.transpose(1, 2)) / 0.2  # row i: its own key (the label) and the 4 other keys
    expected = F.cross_entropy(logits.flatten(0, 1), torch.arange(5).repeat(2), reduction="none").view(2, 5)
    assert torch.allclose(losses, expected.mean(dim=1), atol=1e-5)
    with pytest.raises(ValueError, match="no negatives"):
        info_nce_per_level(q, k, None, 0.2)
    with pytest.raises(ConfigError, match="inbatch_negatives"):
        InsLoc("tiny-fpn", K=16, canvas=S, queue_negatives=False)


def test_momentum_update_equals_the_reference_loop():
    torch.manual_seed(0)
    model = InsLoc("tiny-fpn", K=16, canvas=S, m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_q = [p.detach().clone() for p in model.encoder_q.parameters()]
    before_k = [p.detach().clone() for p in model.encoder_k.parameters()]
    buffers_k = [b.clone() for b in model.encoder_k.buffers()]
    model._momentum_update_key_encoder()
    for pk, k0, q0 in zip(model.encoder_k.parameters(), before_k, before_q):
        assert torch.allclose(pk, k0 * 0.9 + q0 * 0.1, atol=1e-6)
    for p, q0 in zip(model.encoder_q.parameters(), before_q):
        assert torch.equal(p, q0)
    # parameters only: BN running statistics of the key encoder are untouched
    assert all(torch.equal(b, b0) for b, b0 in zip(model.encoder_k.buffers(), buffers_k))


def test_key_encoder_gets_no_gradient_and_query_does(tiny):
    q, q_box, k, k_box = _inputs()
    out = tiny(q, q_box, k, k_box, generator=torch.Generator().manual_seed(0))
    diagnostics = {"inbatch_top1", "cos_q", "cos_k", "emb_std"}
    assert set(out) == {"loss"} | diagnostics | {f"{p}_{lv}" for p in ("loss", "acc", *diagnostics)
                                                 for lv in ("p2", "p3", "p4", "p5")}
    expected = sum(out[f"loss_{lv}"] for lv in tiny.levels)
    assert torch.allclose(out["loss"].detach(), expected)
    tiny.zero_grad(set_to_none=True)
    out["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in tiny.encoder_k.parameters())
    grads = [p.grad for p in tiny.encoder_q.parameters()]
    assert all(g is not None for g in grads), "every query parameter (trunk, FPN, head, projection) is trained"
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_box_jitter_only_at_p5_of_the_query(monkeypatch):
    torch.manual_seed(0)
    model = InsLoc("tiny-fpn", K=16, canvas=S)
    calls: list[tuple[torch.Tensor, float]] = []
    real = insloc_module.roi_align

    def spy(feature, rois, output_size, spatial_scale, sampling_ratio, aligned):
        assert (output_size, sampling_ratio, aligned) == (7, 0, True)
        calls.append((rois[:, 1:].detach().clone(), spatial_scale))
        return real(feature, rois, output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                    aligned=aligned)

    monkeypatch.setattr(insloc_module, "roi_align", spy)
    q, q_box, k, k_box = _inputs()
    jittered = model.box_jitter(q_box, generator=torch.Generator().manual_seed(5))
    model(q, q_box, k, k_box, generator=torch.Generator().manual_seed(5))
    assert len(calls) == 8  # 4 query levels, then 4 key levels: every level, no level mapping
    assert [c[1] for c in calls] == [1 / 4, 1 / 8, 1 / 16, 1 / 32] * 2
    for level in range(3):
        assert torch.equal(calls[level][0], q_box)
    assert torch.equal(calls[3][0], jittered) and not torch.equal(jittered, q_box)
    for level in range(4, 8):
        assert torch.equal(calls[level][0], k_box)


def test_jitter_can_be_disabled_and_c4_jitters_its_single_level(monkeypatch):
    calls = []
    real = insloc_module.roi_align

    def spy(feature, rois, output_size, **kwargs):
        calls.append((rois[:, 1:].clone(), output_size, kwargs["spatial_scale"]))
        return real(feature, rois, output_size, **kwargs)

    monkeypatch.setattr(insloc_module, "roi_align", spy)
    q, q_box, k, k_box = _inputs()
    torch.manual_seed(0)
    c4 = InsLoc("tiny-c4", K=16, canvas=S)
    out = c4(q, q_box, k, k_box, generator=torch.Generator().manual_seed(2))
    assert set(out) == {"loss", "loss_c4", "acc_c4", "inbatch_top1", "cos_q", "cos_k", "emb_std"}
    jittered = c4.box_jitter(q_box, generator=torch.Generator().manual_seed(2))
    assert [(c[1], c[2]) for c in calls] == [(14, 1 / 16)] * 2
    assert torch.equal(calls[0][0], jittered) and torch.equal(calls[1][0], k_box)
    calls.clear()
    plain = InsLoc("tiny-fpn", K=16, canvas=S, box_jitter=False)
    plain(q, q_box, k, k_box)
    assert all(torch.equal(c[0], q_box) for c in calls[:4])


def test_query_backbone_is_the_exported_bundle_without_key_map(tiny):
    reference = InsLocBackbone("tiny-fpn")
    assert isinstance(tiny.query_backbone(), InsLocBackbone)
    assert set(tiny.query_backbone().state_dict()) == set(reference.state_dict())
    c4 = InsLoc("tiny-c4", K=16, canvas=S)
    assert set(c4.query_backbone().state_dict()) == set(InsLocBackbone("tiny-c4").state_dict())


def test_official_init_of_the_projection():
    torch.manual_seed(0)
    fresh = InsLoc("tiny-fpn", K=16, canvas=S)
    proj = fresh.encoder_q.projection
    assert proj.fc2.weight.shape == (64, 64) and proj.embed.weight.shape == (128, 64)
    with torch.no_grad():
        assert abs(float(proj.embed.weight.std()) - 0.01) < 0.002 and float(proj.embed.bias.abs().max()) == 0.0
        bound = math.sqrt(6.0 / (64 + 64))  # xavier-uniform
        assert float(proj.fc2.weight.abs().max()) <= bound and float(proj.fc2.bias.abs().max()) == 0.0
    # key encoder starts as an exact copy
    for pq, pk in zip(fresh.encoder_q.parameters(), fresh.encoder_k.parameters()):
        assert torch.equal(pq, pk)


def test_single_process_shuffle_is_a_no_op(tiny):
    x, boxes = torch.randn(3, 3, 8, 8), torch.rand(3, 4)
    x2, boxes2, idx = tiny._batch_shuffle_ddp(x, boxes)
    assert x2 is x and boxes2 is boxes and idx is None
    assert tiny._batch_unshuffle_ddp(x, None) is x


def test_invalid_settings():
    with pytest.raises(ConfigError):
        InsLoc("tiny-fpn", K=0)
    with pytest.raises(ConfigError, match="jitter_levels"):
        InsLoc("tiny-fpn", K=8, canvas=S, jitter_levels=("p7",))
    with pytest.raises(ConfigError, match="one loss weight per level"):
        InsLoc("tiny-fpn", K=8, canvas=S, level_weights=(1, 1))
    custom = InsLoc("tiny-fpn", K=8, canvas=S, box_jitter=BoxJitter.for_canvas(S), level_weights=(0, 0, 0, 1))
    q, q_box, k, k_box = _inputs()
    out = custom(q, q_box, k, k_box)
    assert torch.allclose(out["loss"].detach(), out["loss_p5"])


def test_moco_baseline_smoke():
    torch.manual_seed(0)
    model = MoCo("tiny-fpn", K=8)
    q, _, k, _ = _inputs()
    out = model(q, None, k, None)
    assert set(out) == {"loss", "loss_image", "acc_image", "inbatch_top1", "cos_q", "cos_k", "emb_std"}
    out["loss"].backward()
    assert model.query_backbone().config.parts == ("trunk",)
    assert model.box_jitter is None and int(model.queue_ptr) == B
    c4 = MoCo("tiny-c4", K=8)
    assert c4.query_backbone().config.parts == ("trunk", "box_head")


def test_moco_decode_dataset_feeds_the_batched_composer_with_the_reference_draws(tmp_path):
    from insloc_hub.training.pretraining.compose import CompositionConfig, compose_batch
    from insloc_hub.training.pretraining.moco import MocoDecodeDataset, MocoPretrainDataset
    from insloc_hub.training.pretraining.pretrain_data import UnlabelledImages, collate_decoded
    from tests.training.test_engine import write_photos

    images = UnlabelledImages(write_photos(tmp_path, count=4, side=120))
    comp = CompositionConfig.for_canvas(S)
    ref, dec = MocoPretrainDataset(images, comp, seed=5), MocoDecodeDataset(images, comp, seed=5, max_side=512)
    batch = collate_decoded([dec[i] for i in range(len(dec))])
    assert batch["bg_q"].shape == (4, 3, S, S) and not batch["bg_q"].any()
    q, qb, k, kb = compose_batch(batch["fg"], batch["bg_q"], batch["bg_k"], comp, params=batch["params"])
    assert q.shape == (4, 3, S, S)
    for i in range(len(ref)):  # same draws -> same boxes as the CPU reference path
        assert torch.equal(qb[i], ref[i]["q_box"]) and torch.equal(kb[i], ref[i]["k_box"])
    small = MocoDecodeDataset(images, comp, seed=5, max_side=50)[0]
    assert max(small["fg"].shape[1:]) == 50
    assert small["params"].foreground_size == (small["fg"].shape[2], small["fg"].shape[1])


def test_projection_norm_centres_the_embeddings_per_level_when_asked():
    torch.manual_seed(0)
    x = torch.randn(6 * 4, 32) + torch.arange(4).repeat(6).unsqueeze(1).float() * 5  # level-dependent offset
    mixed = insloc_module.Projection(32, 32, 8, norm=True).train()(x).view(6, 4, 8)
    per_level = insloc_module.Projection(32, 32, 8, norm=True, groups=4).train()(x).view(6, 4, 8)
    assert torch.allclose(per_level.mean(dim=0), torch.zeros(4, 8), atol=1e-5)  # each level centred
    assert mixed.mean(dim=0).abs().max() > 0.1  # one set of statistics leaves a per-level mean
    with pytest.raises(ConfigError, match="projection_norm"):
        InsLoc("tiny-fpn", K=16, canvas=S, projection_norm="yes")
    level = InsLoc("tiny-fpn", K=16, canvas=S, projection_norm="level")
    assert level.encoder_q.projection.norm2.num_features == 4 * 64


def test_symmetric_loss_is_the_mean_of_both_directions():
    import copy

    torch.manual_seed(0)
    base = InsLoc("tiny-fpn", K=16, canvas=S, box_jitter=False, projection_norm="batch", inbatch_negatives=True)
    symmetric, forward, backward = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    symmetric.symmetric_loss = True
    q, q_box, k, k_box = _inputs()
    both = symmetric(q, q_box, k, k_box)
    one = forward(q, q_box, k, k_box)  # the official direction
    other = backward(k, k_box, q, q_box)  # the key view as query, from the same weights and queue
    assert torch.allclose(both["loss"], (one["loss"] + other["loss"]) / 2, atol=1e-5)
    # diagnostics and the enqueued keys are those of the first direction, as without the option
    assert float(both["inbatch_top1"]) == float(one["inbatch_top1"])
    assert torch.allclose(symmetric.queue, forward.queue) and int(symmetric.queue_ptr) == int(forward.queue_ptr)
    both["loss"].backward()
    assert all(p.grad is not None for p in symmetric.encoder_q.parameters())


def test_predictor_trains_on_the_query_side_only_and_is_not_exported():
    torch.manual_seed(0)
    model = InsLoc("tiny-fpn", K=16, canvas=S, projection_norm="batch", predictor_hidden=32)
    assert InsLoc("tiny-fpn", K=16, canvas=S).predictor is None
    q, q_box, k, k_box = _inputs()
    out = model(q, q_box, k, k_box, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert not any("predictor" in name for name in model.encoder_k.state_dict())
    assert not any("predictor" in name for name in model.query_backbone().state_dict())
    with pytest.raises(ConfigError, match="predictor_hidden"):
        InsLoc("tiny-fpn", K=16, canvas=S, predictor_hidden=-1)
