"""Is contrastive pretraining learning, or collapsing? Embedding diagnostics, a collapse alarm, a plot.

A falling InfoNCE loss does not prove that a momentum-contrast model learns to tell instances
apart: with a queue the loss also drops when current embeddings merely differ from *older* queued
keys (recency). These measurements cannot be fooled that way; they are computed from the current
batch only:

* ``inbatch_top1`` (%): how often a query's most similar key, among the keys of the current
  (global) batch, is its own. Chance is ``100 / batch``; instance discrimination pushes it to 100.
* ``cos_q`` / ``cos_k``: mean pairwise cosine of the query / key embeddings of the batch. Near 1
  means every image gets the same embedding (collapse).
* ``emb_std``: the per-dimension standard deviation of the L2-normalised embeddings over the batch,
  averaged over dimensions. About ``1 / sqrt(dim)`` (0.088 at 128-d) when the embeddings spread on the
  sphere, towards 0 when they collapse (the SimSiam criterion).

Names in metrics.jsonl: the total (mean over levels) without suffix, each level with its name as
suffix (``inbatch_top1_p2`` ... ``inbatch_top1_p5``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["DIAGNOSTIC_NAMES", "COLLAPSE_COS_K", "COLLAPSE_STD_FRACTION", "embedding_diagnostics",
           "CollapseMonitor", "summarize", "plot_curves"]

logger = logging.getLogger(__name__)

DIAGNOSTIC_NAMES = ("inbatch_top1", "cos_q", "cos_k", "emb_std")

COLLAPSE_COS_K = 0.95
"""A run is called collapsed when the mean pairwise key cosine exceeds this ..."""
COLLAPSE_STD_FRACTION = 0.25
"""... or the per-dimension std falls below this fraction of the healthy ``1 / sqrt(dim)``,
while the in-batch top-1 is at most twice chance (both measured on the total over levels)."""


def _mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """``x``: ``[L, B, dim]`` unit vectors -> ``[L]`` mean cosine over the ``B (B - 1)`` ordered pairs."""
    batch = x.shape[1]
    if batch < 2:
        return torch.ones(x.shape[0], device=x.device)
    total = x.sum(dim=1)  # |sum x|^2 = sum_ij x_i.x_j = B + sum_{i != j} x_i.x_j
    return ((total * total).sum(dim=-1) - batch) / (batch * (batch - 1))


@torch.no_grad()
def embedding_diagnostics(q: torch.Tensor, k: torch.Tensor, levels: Sequence[str]) -> dict[str, torch.Tensor]:
    """In-batch top-1 (%), query / key mean pairwise cosine and per-dimension std, per level and in total.

    Args:
        q, k: ``[L, B, dim]`` L2-normalised query and key embeddings of the **same** images (row i of
            ``k`` is the positive of row i of ``q``); pass the keys of the whole global batch and the
            matching queries.
        levels: the ``L`` level names, used as suffixes.

    Returns:
        ``{"inbatch_top1": ..., "inbatch_top1_p2": ..., "cos_q": ..., ..., "emb_std_p5": ...}`` as 0-d
        float tensors (still on the device; nothing is synchronised here).

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(1, 8, 16), dim=-1)
        >>> float(embedding_diagnostics(q, q, ["p5"])["inbatch_top1"])
        100.0
    """
    q, k = q.detach().float(), k.detach().float()
    sim = torch.bmm(q, k.transpose(1, 2))  # [L, B, B]
    own = torch.arange(q.shape[1], device=q.device)
    top1 = (sim.argmax(dim=-1) == own).float().mean(dim=1) * 100.0
    per_level = {
        "inbatch_top1": top1,
        "cos_q": _mean_pairwise_cosine(q),
        "cos_k": _mean_pairwise_cosine(k),
        "emb_std": q.std(dim=1).mean(dim=-1) if q.shape[1] > 1 else torch.zeros(q.shape[0], device=q.device),
    }
    out: dict[str, torch.Tensor] = {}
    for name, values in per_level.items():
        out[name] = values.mean()
        if len(levels) > 1:
            for i, level in enumerate(levels):
                out[f"{name}_{level}"] = values[i]
    return out


class CollapseMonitor:
    """Warns once, with the step, when the logged diagnostics say the embeddings collapsed.

    Collapsed = (``cos_k > COLLAPSE_COS_K`` or ``emb_std < COLLAPSE_STD_FRACTION / sqrt(dim)``) and
    ``inbatch_top1 <= 2 x chance``: the keys are (nearly) one vector and the query cannot find its own.
    """

    def __init__(self, dim: int, batch_size: int) -> None:
        self.std_floor = COLLAPSE_STD_FRACTION / math.sqrt(dim)
        self.chance = 100.0 / max(1, batch_size)
        self.collapsed_at: int | None = None

    def is_collapsed(self, record: dict[str, Any]) -> bool:
        if "cos_k" not in record:
            return False
        degenerate = record["cos_k"] > COLLAPSE_COS_K or record.get("emb_std", 1.0) < self.std_floor
        return degenerate and record.get("inbatch_top1", 0.0) <= 2.0 * self.chance

    def replay(self, records: Sequence[dict[str, Any]]) -> int | None:
        """Take the collapse step from records logged before a resume, without warning again."""
        self.collapsed_at = next((r["step"] for r in records if self.is_collapsed(r)), None)
        return self.collapsed_at

    def update(self, step: int, record: dict[str, Any]) -> bool:
        """Check one metrics record; returns True (and warns) the first time the run looks collapsed."""
        if self.collapsed_at is not None or not self.is_collapsed(record):
            return False
        self.collapsed_at = step
        logger.warning(
            "COLLAPSE at step %d: mean key cosine %.3f (threshold %.2f), embedding std %.4f (healthy ~%.3f), in-batch "
            "top-1 %.1f%% (chance %.1f%%). The embeddings no longer tell images apart; see docs/pretraining.md, "
            "'Collapse' (try --preset small-data on small data sets).", step, record["cos_k"], COLLAPSE_COS_K,
            record.get("emb_std", float("nan")), self.std_floor / COLLAPSE_STD_FRACTION, record.get("inbatch_top1",
                                                                                                     float("nan")),
            self.chance)
        return True


def summarize(records: Sequence[dict[str, Any]], *, batch_size: int, dim: int, collapsed_at: int | None,
              tail: int = 5) -> dict[str, Any]:
    """The diagnostics of a run for its config/card: means over the last ``tail`` logged records.

    Returns ``{}`` when no record carries diagnostics.
    """
    logged = [r for r in records if "inbatch_top1" in r]
    if not logged:
        return {}
    last = logged[-tail:]
    keys = sorted({k for r in last for k in r if k.split("_p")[0] in DIAGNOSTIC_NAMES})  # totals and levels
    summary: dict[str, Any] = {k: round(sum(r[k] for r in last if k in r) / len(last), 4) for k in keys}
    summary.update({
        "steps": [last[0]["step"], last[-1]["step"]],
        "chance_inbatch_top1": round(100.0 / batch_size, 3),
        "healthy_emb_std": round(1.0 / math.sqrt(dim), 4),
        "collapsed_at_step": collapsed_at,
    })
    return summary


def plot_curves(records: Sequence[dict[str, Any]], path: Path, *, chance_loss: float | None = None,
                batch_size: int | None = None) -> bool:
    """Write ``path`` (PNG): loss vs its chance level, in-batch top-1, cosines and std, lr against step.

    Returns False (and logs once why) when matplotlib is not installed (``pip install insloc-hub[plots]``)
    or there is nothing to plot; never raises for a drawing problem.
    """
    logged = [r for r in records if "loss" in r]
    if not logged:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not getattr(plot_curves, "_warned", False):
            logger.info("matplotlib is not installed: no curves.png (pip install 'insloc-hub[plots]')")
            plot_curves._warned = True  # type: ignore[attr-defined]
        return False
    try:
        steps = [r["step"] for r in logged]

        def series(ax: Any, name: str, **style: Any) -> None:
            ax.plot(steps, [r.get(name, float("nan")) for r in logged], **style)

        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        (loss_ax, top1_ax), (cos_ax, lr_ax) = axes
        series(loss_ax, "loss", label="loss")
        if chance_loss is not None:
            loss_ax.axhline(chance_loss, color="grey", ls="--", label=f"chance {chance_loss:.2f}")
        levels = sorted({k[len("inbatch_top1_"):] for r in logged for k in r if k.startswith("inbatch_top1_")})
        for level in levels:
            series(top1_ax, f"inbatch_top1_{level}", lw=0.8, label=level)
        series(top1_ax, "inbatch_top1", color="k", label="total")
        if batch_size:
            top1_ax.axhline(100.0 / batch_size, color="grey", ls="--", label="chance")
        top1_ax.set_ylim(0, 100)
        for name in ("cos_q", "cos_k"):
            series(cos_ax, name, label=name)
        cos_ax.set_ylim(-0.1, 1.05)
        series(lr_ax, "lr", label="lr")
        for ax, title in zip(axes.flat, ("loss", "in-batch top-1 (%)", "mean pairwise cosine", "learning rate")):
            ax.set_title(title)
            ax.set_xlabel("step")
            if ax is not lr_ax:
                ax.legend(fontsize=7 if ax is top1_ax else None)
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        tmp.replace(path)
        return True
    except Exception as err:  # noqa: BLE001 - a picture must never stop training
        logger.warning("could not write %s: %s", path, err)
        return False
