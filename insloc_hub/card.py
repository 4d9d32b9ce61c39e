"""Model cards: README.md of a hub folder, built with huggingface_hub's ``ModelCard`` from config.json."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CITATION = """@inproceedings{yang2021insloc,
  title     = {Instance Localization for Self-supervised Detection Pretraining},
  author    = {Yang, Ceyuan and Wu, Zhirong and Zhou, Bolei and Lin, Stephen},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2021}
}"""


def card_data(config: dict[str, Any]) -> ModelCardData:
    """The metadata the Hub reads (library_name, license, tags, datasets, base_model, model-index)."""
    detection = config.get("task") == "detection"
    arch, provenance = config["architecture"], config.get("provenance", {})
    datasets = provenance.get("datasets") or ([provenance["data"]] if provenance.get("data") else None)
    base_model = provenance.get("base_model")
    if not (isinstance(base_model, str) and base_model.count("/") == 1 and not base_model.startswith(("/", "."))):
        base_model = None  # a local path is no Hub model
    results = [  # fine-tuned detectors: one EvalResult per finite metric
        EvalResult(task_type=r.get("task", "object-detection"), dataset_name=r.get("dataset", "unknown"),
                   dataset_type=r.get("dataset_type", r.get("dataset", "")), metric_type=metric, metric_value=value)
        for r in config.get("results") or [] for metric, value in _metrics(r).items()
    ]
    return ModelCardData(
        library_name="insloc-hub", license=config.get("license", "apache-2.0"), datasets=datasets,
        tags=["insloc", "self-supervised", "object-detection" if detection else "feature-extraction",
              f"resnet{arch['depth']}", arch["variant"], "torchvision", "safetensors"],
        pipeline_tag="object-detection" if detection else "image-feature-extraction", base_model=base_model,
        model_name=config.get("name", "insloc-model") if results else None, eval_results=results or None,
    )


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of a result (NaN/None, e.g. AP of a class without boxes, are left out)."""
    return {k: v for k, v in (result.get("metrics") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def _diagnostics_lines(diagnostics: dict[str, Any] | None) -> list[str]:
    """The pretraining's collapse diagnostics (``provenance["diagnostics"]``), if it recorded them."""
    if not isinstance(diagnostics, dict) or not diagnostics:
        return []
    if "inbatch_top1" not in diagnostics:  # numbers recorded by other code: list them as they are
        return ["", "## Diagnostics", "Measured during pretraining (see the run's metrics.jsonl):", "",
                *(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {_one_line(v)}"
                  for k, v in diagnostics.items())]
    first, last = diagnostics.get("steps", ["?", "?"])
    collapsed = diagnostics.get("collapsed_at_step")
    return [
        "",
        f"### Pretraining diagnostics (mean of the logged steps {first}-{last})",
        f"- in-batch top-1: {diagnostics['inbatch_top1']:.1f} % "
        f"(chance {diagnostics.get('chance_inbatch_top1', '?')} %)",
        f"- mean pairwise cosine: queries {diagnostics.get('cos_q', float('nan')):.3f}, keys "
        f"{diagnostics.get('cos_k', float('nan')):.3f}",
        f"- embedding std per dimension: {diagnostics.get('emb_std', float('nan')):.4f} (healthy about "
        f"{diagnostics.get('healthy_emb_std', '?')})",
        "- collapse: " + (f"**detected at step {collapsed}** (the embeddings stopped telling images apart)"
                          if collapsed is not None else "not detected"),
    ]


def render_card(config: dict[str, Any], folder: str | os.PathLike[str] | None = None) -> str:
    """README.md text for a hub folder, from its config.json contents.

    The usage snippet loads the model by ``config["repo_id"]`` when the folder is meant for a Hub
    repo, else by ``folder`` (its path as given), so the snippet works as printed.
    """
    arch, provenance = config["architecture"], config.get("provenance", {})
    detection = config.get("task") == "detection"
    name = config.get("name", "InsLoc model")
    where = config.get("repo_id") or (os.fspath(folder) if folder is not None else name)
    body = [
        f"# {name}", "",
        ("A torchvision detector fine-tuned from an InsLoc-pretrained backbone." if detection else
         "A ResNet backbone pretrained with InsLoc (Instance Localization for Self-supervised Detection "
         "Pretraining, Yang et al., CVPR 2021): the trunk, FPN and detection box head are pretrained together "
         "by recognising a pasted instance from RoI features at its box."),
        "", "## Architecture",
        f"- ResNet-{arch['depth']} (width {arch['width']}), variant `{arch['variant']}`",
        f"- pretrained parts: {', '.join(config.get('pretrained_parts', []))}",
    ]
    if detection:
        det = config["detector"]
        body.append(f"- detector: `{det['arch']}`, {det['num_classes']} classes (background included)")
        if det.get("class_names"):
            body.append(f"- class names: {', '.join(det['class_names'])}")
    body += ["", "## Usage", "```python", "import insloc_hub",
             f"model = insloc_hub.from_pretrained({json.dumps(where)})"]
    if not detection:
        body.append('detector = insloc_hub.build_detector("faster_rcnn_fpn", class_names=["cat"], pretrained=model)')
    preprocessing = config["preprocessing"]
    body += ["```", "", "## Preprocessing",
             f"RGB, values in [0, 1], normalised with mean {preprocessing['mean']} and std {preprocessing['std']} "
             "(detectors normalise internally).", "", "## Training"]
    body += [f"- {k}: {_one_line(v)}" for k, v in provenance.items() if not isinstance(v, (dict, list))]
    body += [] if provenance else ["- not recorded"]
    deviations = provenance.get("deviations_from_official")
    if isinstance(deviations, list) and deviations:  # one bullet each: a reason can run to a paragraph
        body += ["", "### Deviations from the official recipe", *(f"- {_one_line(d)}" for d in deviations)]
    body += _diagnostics_lines(provenance.get("diagnostics"))
    if any(_metrics(r) for r in config.get("results") or []):
        body += ["", "## Results", "", "| dataset | metric | value |", "|---|---|---|"]
        body += [f"| {r.get('dataset', '')} | {k} | {v} |" for r in config["results"] for k, v in _metrics(r).items()]
    weights = config["weights"]
    body += ["", "## Weights", f"`model.safetensors`, sha256 `{weights['sha256']}`, "
             f"{weights['num_parameters']:,} parameters.", "", "## Citation", "```bibtex", CITATION, "```", ""]
    return str(ModelCard.from_template(card_data(config), template_str="---\n{{ card_data }}\n---\n\n{{ body }}",
                                       body="\n".join(body)))
