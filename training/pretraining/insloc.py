"""InsLoc: Instance Localization for self-supervised detection pretraining, in one file.

Yang, Wu, Zhou, Lin, CVPR 2021 (arXiv 2102.08318). This module follows the official code
(limbo0000/InstanceLoc @ a419bb6: ``mmdet/models/detectors/insloc_fpn.py``,
``roi_heads/moco_standard_roi_head.py``, ``bbox_heads/convfc_bbox_inscls_head.py``, config
``configs/FPN/insloc_fpn_200ep.py``); section numbers refer to docs insloc-method.md. It reads top
to bottom like MoCo's ``builder.py``:

1. **Encoders** (section 3.1). The query encoder is an :class:`~insloc_hub.models.InsLocBackbone`
   -- ResNet trunk, FPN with BN (P2-P5) and the 4conv1fc box head -- followed by a projection:
   ``fc2`` (1024->1024, ReLU; the official second shared fc) and ``embed`` (1024->128; the
   official ``fc_cls``). Because the backbone *is* the bundle that detectors load, exporting it needs
   no key map; the projection is dropped at export like the official converter drops
   ``shared_fcs.1`` and ``fc_cls``. The key encoder is a deep copy without gradients.
2. **RoI features** (section 3.1, pitfall 6). The single box of each image is pooled from **every**
   level with ``roi_align(7x7, sampling_ratio=0, aligned=True)`` (no FPN level assignment) and all
   levels go through **one shared head**; embeddings are L2-normalised.
3. **Box jitter** (section 2, pitfall 5). Only the query's **P5** pools with a jittered box (one
   anchor with IoU > 0.5 with the ground truth); query P2-P4 and every key level use the ground
   truth (config ``box_replaced_with_gt=[True, True, True, False]``).
4. **Momentum update** (section 4). ``theta_k <- m theta_k + (1 - m) theta_q`` on parameters only,
   m = 0.999, inside ``no_grad`` *before* the key forward.
5. **Shuffle-BN** (pitfall 10). Key images **and their boxes** are gathered, permuted (rank 0's
   permutation), forwarded, and the embeddings un-shuffled.
6. **Loss** (section 4, pitfall 9). One queue per level (128 x K, K = 65536, one shared pointer);
   per level ``InfoNCE([q.k, q.queue] / T)`` with T = 0.2, summed with weights (1, 1, 1, 1). No
   image-level loss.
7. **Enqueue.** Keys of all GPUs are gathered and written at the pointer into every level's queue.

The C4 variant (``arch="r50-c4"``) is a **reconstruction**: the official C4 pretraining config was
never released (limbo0000/InstanceLoc issue #14). Known from the official converter: trunk = stem +
res2-res4, RoI head = res5 (``roi_head.shared_head.layer4``). Chosen here (section 3.2, marked
[inferred] there): RoIAlign 14x14 on res4 (stride 16) -> res5 -> global average pool -> MoCo v2 MLP
2048-2048-128, box jitter on its single level, one queue.

Example::

    model = InsLoc("r50-fpn")                       # official FPN recipe
    out = model(q_img, q_box, k_img, k_box)         # images [B, 3, 256, 256], boxes [B, 4] xyxy
    out["loss"].backward()                          # sum of the four per-level InfoNCE losses
    backbone = model.query_backbone()               # InsLocBackbone to save_pretrained()
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from insloc_hub.errors import ConfigError
from insloc_hub.models import BackboneConfig, InsLocBackbone, backbone_config
from insloc_hub.training.pretraining.boxaug import BoxJitter
from insloc_hub.training.pretraining.diagnostics import embedding_diagnostics
from insloc_hub.training.runtime.distributed import all_gather_tensor, broadcast_tensor, get_rank, get_world_size

__all__ = ["PROJECTION_NORMS", "FPN_LEVELS", "FPN_STRIDES", "Projection", "Encoder", "InsLoc", "info_nce_per_level",
           "predictor_mlp", "host_to_device"]

FPN_LEVELS = ("p2", "p3", "p4", "p5")
FPN_STRIDES = (4, 8, 16, 32)
C4_STRIDE = 16
PROJECTION_NORMS = ("off", "batch", "level")


class Projection(nn.Module):
    """``fc2 -> ReLU -> embed``: the part of the pretraining head that is not transferred.

    FPN (official): ``fc2`` is the head's second shared fc (1024->1024, Xavier-uniform, bias 0) and
    ``embed`` the 128-d ``fc_cls`` (N(0, 0.01), bias 0). C4 reconstruction and the MoCo baseline:
    the MoCo v2 MLP (2048->2048->128 with PyTorch's default ``nn.Linear`` init, as MoCo v2).

    ``norm=True`` (not official; the ``small-data`` preset) adds BatchNorm after ``fc2`` and a
    parameter-free BatchNorm after ``embed``, as MoCo v3's projector does (Chen et al., ICCV 2021).
    With ``groups`` > 1 (the FPN levels, roi-major / level-minor rows) each level is normalised with
    its own statistics, so no level can keep a common component of its own.
    """

    def __init__(self, in_dim: int, hidden_dim: int, dim: int = 128, *, official_init: bool = True,
                 norm: bool = False, groups: int = 1) -> None:
        super().__init__()
        self.groups = int(groups)
        self.fc2 = nn.Linear(in_dim, hidden_dim, bias=not norm)
        self.norm2 = nn.BatchNorm1d(hidden_dim * self.groups) if norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.embed = nn.Linear(hidden_dim, dim, bias=not norm)
        self.norm_out = nn.BatchNorm1d(dim * self.groups, affine=False) if norm else nn.Identity()
        if official_init:
            nn.init.xavier_uniform_(self.fc2.weight)
            nn.init.normal_(self.embed.weight, 0.0, 0.01)
            for layer in (self.fc2, self.embed):
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def _norm(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1 or isinstance(layer, nn.Identity):
            return layer(x)
        return layer(x.reshape(-1, self.groups * x.shape[-1])).view_as(x)  # [B, L * C]: statistics per level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self._norm(self.norm2, self.fc2(x)))
        return self._norm(self.norm_out, self.embed(x))


class Encoder(nn.Module):
    """One side of InsLoc: ``backbone`` (exported) + ``projection`` (dropped at export).

    ``forward(images, boxes)`` returns L2-normalised float32 embeddings ``[B, L, dim]`` -- one per
    image and level, roi-major / level-minor as the official head stacks them -- where ``boxes`` is
    ``[L, B, 4]`` (xyxy canvas pixels, one box per image per level).

    Pooling modes: ``"fpn"`` (RoIAlign 7x7 on P2-P5, shared 4conv1fc head) and ``"c4"`` (RoIAlign
    ``roi_size`` on res4, res5 head with average pooling). The MoCo baseline's image-level encoder
    overrides :meth:`features` (``training/pretraining/moco.py``).
    """

    def __init__(self, backbone: InsLocBackbone, projection: Projection, pooling: str,
                 levels: Sequence[str], strides: Sequence[int], roi_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        self.pooling = pooling
        self.levels = tuple(levels)
        self.strides = tuple(strides)
        self.roi_size = int(roi_size)

    def _pool(self, feature: torch.Tensor, boxes: torch.Tensor, stride: int) -> torch.Tensor:
        if feature.dtype in (torch.float16, torch.bfloat16):
            # pool in float32, as torchvision's autocast wrapper does, so box coordinates stay exact
            feature = feature.float()
        # one box per image: rois = [batch_index, x1, y1, x2, y2]
        index = torch.arange(boxes.shape[0], device=boxes.device, dtype=feature.dtype).unsqueeze(1)
        rois = torch.cat([index, boxes.to(feature.dtype)], dim=1)
        # mmdet RoIAlign(out_size=7, sample_num=0, aligned=True) == torchvision's, no level mapping
        return roi_align(feature, rois, self.roi_size, spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)

    def features(self, images: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """Head features before the projection: ``[B * L, C]``, roi-major / level-minor."""
        batch = images.shape[0]
        if boxes is None or boxes.shape[:2] != (len(self.levels), batch):
            raise ValueError(f"boxes must be [{len(self.levels)}, {batch}, 4], got "
                             f"{None if boxes is None else tuple(boxes.shape)}")
        if self.pooling == "fpn":
            feats = self.backbone.forward_features(images)
            pooled = [self._pool(feats[name], boxes[i], stride)
                      for i, (name, stride) in enumerate(zip(self.levels, self.strides))]
            x = torch.stack(pooled, dim=1).flatten(0, 1)  # [B * L, C, 7, 7], roi-major
        else:
            c4 = self.backbone.trunk(images)["c4"]
            x = self._pool(c4, boxes[0], self.strides[0])  # [B, C4, 14, 14]
        return self.backbone.box_head(x)  # 4conv1fc -> [B * L, 1024] | res5 + avgpool -> [B, 2048]

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None,
                predictor: nn.Module | None = None) -> torch.Tensor:
        x = self.projection(self.features(images, boxes))
        if predictor is not None:  # query side only (InsLoc ``predictor_hidden``)
            x = predictor(x)
        x = x.float()
        return F.normalize(x, dim=1).view(images.shape[0], -1, x.shape[-1])


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for it: on CUDA pinned and copied non-blocking (a plain
    ``.to(device)`` synchronises the stream)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def predictor_mlp(dim: int, hidden: int) -> nn.Sequential:
    """The query-side predictor of BYOL / MoCo v3 (Grill et al. 2020; Chen et al. 2021), not in InsLoc:
    ``Linear(dim, hidden) -> BN -> ReLU -> Linear(hidden, dim)``, PyTorch's default init."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


def info_nce_per_level(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, temperature: float,
                       *, inbatch_negatives: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level InfoNCE losses and top-1 accuracies (%), all levels in one ``bmm``.

    Args:
        q, k: ``[L, B, dim]`` normalised query / key embeddings (keys carry no gradient).
        queue: ``[L, dim, K]`` negatives, one queue per level; ``None``: no queue negatives (not official;
            then ``inbatch_negatives`` must be on, as in MoCo v3).
        temperature: T (0.2).
        inbatch_negatives: also use the other keys of the batch as negatives (not official; the
            ``small-data`` preset). The official loss ``[q.k+, q.queue]`` is the default.

    Returns:
        ``(losses [L], accuracies [L])``: the mean cross-entropy of ``[l_pos, l_neg] / T`` with label 0
        for each level, and how often the positive has the highest logit.
    """
    l_pos = (q * k).sum(dim=-1, keepdim=True)  # [L, B, 1]
    parts = [l_pos]
    if queue is not None:
        parts.append(torch.bmm(q, queue))  # [L, B, K]
    elif not inbatch_negatives:
        raise ValueError("no negatives: pass a queue or set inbatch_negatives")
    if inbatch_negatives:
        l_batch = torch.bmm(q, k.transpose(1, 2))  # [L, B, B]; the diagonal is the positive, masked out
        own = torch.eye(q.shape[1], dtype=torch.bool, device=q.device)
        parts.append(l_batch.masked_fill(own, float("-inf")))
    logits = torch.cat(parts, dim=-1) / temperature
    labels = torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long, device=q.device)
    losses = F.cross_entropy(logits.flatten(0, 1), labels, reduction="none").view(q.shape[:2]).mean(dim=1)
    accuracies = (logits.detach().argmax(dim=-1) == 0).float().mean(dim=1) * 100.0
    return losses, accuracies


class InsLoc(nn.Module):
    """InsLoc pretraining model: query/key encoders, per-level queues, per-level InfoNCE.

    Args:
        arch: backbone preset or config; variant ``fpn`` is the official method, ``c4`` the
            documented reconstruction.
        dim: embedding size (128).
        K: queue length per level (65536); must be a multiple of the global batch size.
        m: key-encoder momentum (0.999).
        T: softmax temperature (0.2).
        box_jitter: a :class:`BoxJitter`, ``True`` for ``BoxJitter.for_canvas(canvas)`` (the official
            anchors at 256 px), or ``False``/``None`` to pool every level with the ground truth.
        canvas: composition canvas (256), used for the default jitter anchors.
        jitter_levels: query levels pooled with the jittered box (official: ``("p5",)``; C4: its one level).
        level_weights: loss weight per level (official: all 1).
        shuffle_bn: shuffle keys across GPUs for the key forward (no-op in one process, see
            :meth:`_batch_shuffle_ddp`).
        c4_roi_size: RoIAlign size on res4 for the C4 reconstruction (14).
        projection_norm: ``"off"`` (official), ``"batch"`` (BatchNorm in the projection, MoCo v3 style; see
            :class:`Projection`) or ``"level"`` (the same with separate statistics for each FPN level).
        embed_init: ``"official"`` (``embed`` ~ N(0, 0.01)) or ``"default"`` (``nn.Linear``'s init).
        inbatch_negatives: the batch's other keys are negatives too (not official, see
            :func:`info_nce_per_level`).
        symmetric_loss: each view also serves as the query of the other (not official; MoCo v3): the loss
            is the mean of the two directions, both against the same queue; the key view's keys are enqueued
            and the diagnostics describe the first direction, as without it.
        queue_negatives: the queue's keys are negatives (official); ``False`` (not official, needs
            ``inbatch_negatives``) keeps only the keys of the current batch, as MoCo v3 does, so that moving
            every current embedding away from the older queued keys (recency) cannot lower the loss.
        predictor_hidden: > 0 adds :func:`predictor_mlp` with this hidden width on the query side (not
            official; BYOL / MoCo v3); it is trained but not exported.

    ``forward`` also returns the collapse diagnostics of ``training/pretraining/diagnostics.py`` (in-batch top-1,
    cosines, std; per level and in total).
    """

    levels: tuple[str, ...]

    def __init__(
        self,
        arch: str | BackboneConfig = "r50-fpn",
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.2,
        *,
        box_jitter: BoxJitter | bool | None = True,
        canvas: int = 256,
        jitter_levels: Sequence[str] | None = None,
        level_weights: Sequence[float] | None = None,
        shuffle_bn: bool = True,
        c4_roi_size: int = 14,
        projection_norm: str = "off",
        embed_init: str = "official",
        inbatch_negatives: bool = False,
        symmetric_loss: bool = False,
        predictor_hidden: int = 0,
        queue_negatives: bool = True,
    ) -> None:
        super().__init__()
        if K <= 0 or dim <= 0 or not 0.0 <= m <= 1.0 or T <= 0:
            raise ConfigError(f"need K > 0, dim > 0, 0 <= m <= 1 and T > 0; got K={K}, dim={dim}, m={m}, T={T}")
        self.K, self.m, self.T, self.dim = int(K), float(m), float(T), int(dim)
        if embed_init not in ("official", "default"):
            raise ConfigError(f"embed_init must be 'official' or 'default', got {embed_init!r}")
        self.shuffle_bn, self.inbatch_negatives = shuffle_bn, bool(inbatch_negatives)
        if projection_norm not in PROJECTION_NORMS:
            raise ConfigError(f"projection_norm must be one of {PROJECTION_NORMS}, got {projection_norm!r}")
        self.projection_norm, self.embed_init = projection_norm, embed_init
        self.symmetric_loss, self.queue_negatives = bool(symmetric_loss), bool(queue_negatives)
        if not self.queue_negatives and not self.inbatch_negatives:
            raise ConfigError("queue_negatives off needs inbatch_negatives on: otherwise the loss has no negatives")
        if predictor_hidden < 0:
            raise ConfigError(f"predictor_hidden must be >= 0 (0: no predictor), got {predictor_hidden}")

        # -- encoders ------------------------------------------------------------------------------
        self.encoder_q = self._build_encoder(backbone_config(arch), dim, c4_roi_size)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False
        self.levels = self.encoder_q.levels
        self.predictor = predictor_mlp(dim, predictor_hidden) if predictor_hidden else None

        # -- box jitter: query only, at P5 (C4: its single level) ----------------------------------
        if box_jitter is True:
            box_jitter = BoxJitter.for_canvas(canvas)
        self.box_jitter: BoxJitter | None = box_jitter or None
        default_levels = ("p5",) if self.encoder_q.pooling == "fpn" else self.levels
        self.jitter_levels = tuple(jitter_levels) if jitter_levels is not None else default_levels
        if self.box_jitter is not None and not set(self.jitter_levels) <= set(self.levels):
            raise ConfigError(f"jitter_levels {self.jitter_levels} must be among the levels {self.levels}")

        weights = [1.0] * len(self.levels) if level_weights is None else [float(w) for w in level_weights]
        if len(weights) != len(self.levels):
            raise ConfigError(f"need one loss weight per level {self.levels}, got {weights}")
        self.register_buffer("level_weights", torch.tensor(weights), persistent=False)

        # -- one queue per level (randomly initialised, normalised columns), one shared pointer ---
        self.register_buffer("queue", F.normalize(torch.randn(len(self.levels), dim, self.K), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _build_encoder(self, cfg: BackboneConfig, dim: int, c4_roi_size: int) -> Encoder:
        """Query encoder for the FPN method or the C4 reconstruction (overridden by the MoCo baseline)."""
        if cfg.variant == "fpn":
            if tuple(cfg.parts) != ("trunk", "fpn", "box_head"):
                raise ConfigError(f"InsLoc FPN pretrains trunk, fpn and box_head; the config has parts {cfg.parts}")
            backbone = InsLocBackbone(cfg)
            projection = Projection(cfg.head_fc, cfg.head_fc, dim, official_init=self.embed_init == "official",
                                    norm=self.projection_norm != "off",
                                    groups=len(FPN_LEVELS) if self.projection_norm == "level" else 1)
            return Encoder(backbone, projection, "fpn", FPN_LEVELS, FPN_STRIDES, cfg.roi_size)
        if "box_head" not in cfg.parts:
            raise ConfigError("InsLoc C4 pretrains the res5 RoI head; the config must include 'box_head'")
        backbone = InsLocBackbone(cfg)
        width = backbone.embedding_dim  # res5 output channels (2048 for R50)
        projection = Projection(width, width, dim, official_init=False, norm=self.projection_norm != "off")
        return Encoder(backbone, projection, "c4", ("c4",), (C4_STRIDE,), c4_roi_size)

    # ----------------------------------------------------------------------------------------------
    def query_backbone(self) -> InsLocBackbone:
        """The query-side :class:`InsLocBackbone`: what pretraining exports (no key map needed)."""
        return self.encoder_q.backbone

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """``theta_k = m * theta_k + (1 - m) * theta_q`` for every parameter (not BN buffers)."""
        params_q = [p.detach() for p in self.encoder_q.parameters()]
        params_k = [p.detach() for p in self.encoder_k.parameters()]
        torch._foreach_mul_(params_k, self.m)  # one kernel per group instead of a loop over parameters
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys of the global batch (``[B, L, dim]``, already gathered from every process) into
        every level's queue at the pointer."""
        batch_size = keys.shape[0]
        if self.K % batch_size != 0:
            raise ConfigError(f"the queue length K={self.K} must be a multiple of the global batch size "
                              f"{batch_size} (official: 65536 / 256); change --queue-size or --batch-size")
        # columns ptr .. ptr + B - 1, indexed on the device: reading the pointer on the host would wait for the GPU
        columns = (self.queue_ptr + torch.arange(batch_size, device=self.queue_ptr.device)) % self.K
        self.queue.index_copy_(2, columns, keys.permute(1, 2, 0).to(self.queue.dtype))
        self.queue_ptr.add_(batch_size).remainder_(self.K)

    @torch.no_grad()
    def _batch_shuffle_ddp(
        self, x: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Shuffle key images and their boxes across GPUs; returns ``(x, boxes, idx_unshuffle)``.

        In a single process this is a no-op (``idx_unshuffle`` is ``None``): BatchNorm statistics
        are invariant to the order within one batch, so a local permutation would change nothing;
        the key then sees the same per-batch BN statistics as the query, as in single-GPU MoCo.
        """
        world = get_world_size()
        if world == 1 or not self.shuffle_bn:
            return x, boxes, None
        x_gather = all_gather_tensor(x)
        boxes_gather = all_gather_tensor(boxes)
        batch_all = x_gather.shape[0]
        idx_shuffle = host_to_device(torch.randperm(batch_all, generator=generator), x.device)
        broadcast_tensor(idx_shuffle, src=0)  # every rank uses rank 0's permutation
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(world, -1)[get_rank()]
        return x_gather[idx_this], boxes_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x: torch.Tensor, idx_unshuffle: torch.Tensor | None) -> torch.Tensor:
        """Undo :meth:`_batch_shuffle_ddp` on the key embeddings ``[B, L, dim]``."""
        if idx_unshuffle is None:
            return x
        x_gather = all_gather_tensor(x)
        return x_gather[idx_unshuffle.view(get_world_size(), -1)[get_rank()]]

    def _level_boxes(self, boxes: torch.Tensor, jittered: torch.Tensor | None) -> torch.Tensor:
        """``[L, B, 4]``: the jittered box at ``jitter_levels``, the ground truth elsewhere."""
        per_level = [jittered if (jittered is not None and level in self.jitter_levels) else boxes
                     for level in self.levels]
        return torch.stack(per_level)

    def jitter_boxes(self, q_box: torch.Tensor | None, k_box: torch.Tensor | None,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The jittered boxes that :meth:`forward` pools at ``jitter_levels``: ``(query view's, key view's)``.

        The key view's is drawn only with ``symmetric_loss`` (that view is then a query too); ``None`` where
        there is no box or no box jitter. Drawn on the boxes' device with ``generator``. The jitter's NMS has a
        data-dependent output size, which would make a GPU step wait for the device: the trainer calls this on
        host copies of the boxes before the step and passes the result to :meth:`forward` (``jittered``).
        """
        if self.box_jitter is None:
            return None, None
        q_jittered = None if q_box is None else self.box_jitter(q_box.detach().float(), generator=generator)
        if not self.symmetric_loss or k_box is None:
            return q_jittered, None
        return q_jittered, self.box_jitter(k_box.detach().float(), generator=generator)

    def _query(self, img: torch.Tensor, box: torch.Tensor | None, jittered: torch.Tensor | None) -> torch.Tensor:
        """Query embeddings ``[B, L, dim]``: ground-truth boxes, the jittered box at ``jitter_levels``."""
        levels = None
        if box is not None:
            if self.box_jitter is not None and jittered is None:
                raise ValueError("the box jitter is on but no jittered boxes were given for this view")
            levels = self._level_boxes(box, jittered)
        return self.encoder_q(img, levels, self.predictor)

    @torch.no_grad()
    def _key(self, img: torch.Tensor, box: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """Key embeddings ``[B, L, dim]``: shuffled forward (shuffle-BN) with ground-truth boxes on every level."""
        box_in = box if box is not None else torch.zeros(img.shape[0], 4, device=img.device)
        img, box_s, idx_unshuffle = self._batch_shuffle_ddp(img, box_in, generator)
        levels = None if box is None else self._level_boxes(box_s, None)
        return self._batch_unshuffle_ddp(self.encoder_k(img, levels), idx_unshuffle)

    def _info_nce(self, q: torch.Tensor, k: torch.Tensor,
                  queue: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-level InfoNCE losses and accuracies in float32 (autocast off); ``queue`` None: no queue negatives."""
        with torch.autocast(device_type=q.device.type, enabled=False):
            return info_nce_per_level(q.float().transpose(0, 1), k.float().transpose(0, 1), queue, self.T,
                                      inbatch_negatives=self.inbatch_negatives)

    # ----------------------------------------------------------------------------------------------
    def forward(
        self,
        q_img: torch.Tensor,
        q_box: torch.Tensor | None,
        k_img: torch.Tensor,
        k_box: torch.Tensor | None,
        *,
        generator: torch.Generator | None = None,
        diagnostics: bool = True,
        jittered: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One InsLoc step.

        Args:
            q_img, k_img: query / key views, normalised ``[B, 3, S, S]``.
            q_box, k_box: the pasted instance's box in each view, ``[B, 4]`` xyxy canvas pixels.
            generator: CPU generator for the box jitter and the shuffle permutation (the trainer
                seeds one per step, so a resumed run draws the same numbers).
            diagnostics: also measure the collapse diagnostics (the trainer asks at its log steps only;
                under DDP every process must pass the same value: they gather the queries).
            jittered: :meth:`jitter_boxes` drawn beforehand (the trainer draws them on the host, so that the
                step never waits for the device); ``None``: drawn here with ``generator``.

        Returns:
            ``{"loss": sum of weighted per-level losses, "loss_<level>": ..., "acc_<level>": top-1 % against
            the queue, "inbatch_top1", "cos_q", "cos_k", "emb_std" (+ ``_<level>``; with ``diagnostics``)}``.
        """
        if jittered is None:
            jittered = self.jitter_boxes(q_box, k_box, generator)
        q = self._query(q_img, q_box, jittered[0])  # [B, L, dim]; query: GT boxes, jittered box at P5
        with torch.no_grad():  # key: momentum update first, then the shuffled forward with GT boxes on every level
            self._momentum_update_key_encoder()
        k = self._key(k_img, k_box, generator)
        # the loss reads the queue after the in-place enqueue below (bmm saves it for backward): a copy
        queue = self.queue.clone().detach() if self.queue_negatives else None
        losses, accuracies = self._info_nce(q, k, queue)
        if self.symmetric_loss:  # the key view as query of the query view, against the same queue
            q2 = self._query(k_img, k_box, jittered[1])
            k2 = self._key(q_img, q_box, generator)
            losses = (losses + self._info_nce(q2, k2, queue)[0]) / 2
        loss = (losses * self.level_weights.to(losses.device)).sum()
        k_all = all_gather_tensor(k.detach())  # the keys of every process: for the queue and the diagnostics
        self._dequeue_and_enqueue(k_all)

        out = {"loss": loss}
        for i, level in enumerate(self.levels):
            out[f"loss_{level}"] = losses[i].detach()
            out[f"acc_{level}"] = accuracies[i]
        if diagnostics:  # over the global batch: the queries and keys of every process
            q_all = all_gather_tensor(q.detach())
            out.update(embedding_diagnostics(q_all.transpose(0, 1), k_all.transpose(0, 1), self.levels))
        return out
