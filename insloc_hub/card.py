"""Model cards: README.md generated from a hub folder's config.json (Hub YAML metadata + prose)."""

from __future__ import annotations

import json
import math
from typing import Any

CITATION = """@inproceedings{yang2021insloc,
  title     = {Instance Localization for Self-supervised Detection Pretraining},
  author    = {Yang, Ceyuan and Wu, Zhirong and Zhou, Bolei and Lin, Stephen},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2021}
}"""


def _yaml_scalar(value: Any) -> str:
    # JSON strings are valid YAML scalars and quote whatever needs quoting
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def _yaml(data: Any, indent: int = 0) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, (dict, list)) and value:
                lines.append(f"{pad}{key}:")
                lines += _yaml(value, indent + 1)
            else:
                lines.append(f"{pad}{key}: {_yaml_scalar(value) if not isinstance(value, (dict, list)) else '[]'}")
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict):
                sub = _yaml(item, indent + 1)
                lines.append(f"{pad}- {sub[0].strip()}")
                lines += sub[1:]
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    return lines


def card_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """The YAML front matter the Hub reads (library_name, license, tags, datasets, model-index)."""
    detection = config.get("task") == "detection"
    arch = config["architecture"]
    provenance = config.get("provenance", {})
    tags = ["insloc", "self-supervised", "object-detection" if detection else "feature-extraction",
            f"resnet{arch['depth']}", arch["variant"], "torchvision", "safetensors"]
    meta: dict[str, Any] = {
        "library_name": "insloc-hub",
        "license": config.get("license", "apache-2.0"),
        "tags": tags,
        "pipeline_tag": "object-detection" if detection else "image-feature-extraction",
    }
    datasets = provenance.get("datasets") or ([provenance["data"]] if provenance.get("data") else [])
    if datasets:
        meta["datasets"] = list(datasets)
    base_model = provenance.get("base_model")
    if isinstance(base_model, str) and base_model.count("/") == 1 and not base_model.startswith(("/", ".")):
        meta["base_model"] = base_model
    results = [r for r in (config.get("results") or []) if _metrics(r)]
    if results:
        meta["model-index"] = [{
            "name": config.get("name", "insloc-model"),
            "results": [{
                "task": {"type": r.get("task", "object-detection")},
                "dataset": {"name": r.get("dataset", "unknown"), "type": r.get("dataset_type", r.get("dataset", ""))},
                "metrics": [{"type": k, "value": v} for k, v in _metrics(r).items()],
            } for r in results],
        }]
    return meta


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of a result (NaN/None, e.g. AP of a class without boxes, are left out)."""
    return {k: v for k, v in (result.get("metrics") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def _diagnostics_lines(diagnostics: dict[str, Any] | None) -> list[str]:
    """The pretraining's collapse diagnostics (``provenance["diagnostics"]``), if it recorded them."""
    if not diagnostics or "inbatch_top1" not in diagnostics:
        return []
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


def render_card(config: dict[str, Any]) -> str:
    """README.md text for a hub folder, from its config.json contents."""
    arch = config["architecture"]
    detection = config.get("task") == "detection"
    name = config.get("name", "InsLoc model")
    provenance = config.get("provenance", {})
    front = "\n".join(["---", *_yaml(card_metadata(config)), "---"])
    parts = ", ".join(config.get("pretrained_parts", []))
    body = [
        f"# {name}",
        "",
        ("A torchvision detector fine-tuned from an InsLoc-pretrained backbone." if detection else
         "A ResNet backbone pretrained with InsLoc (Instance Localization for Self-supervised Detection "
         "Pretraining, Yang et al., CVPR 2021): the trunk, FPN and detection box head are pretrained together "
         "by recognising a pasted instance from RoI features at its box."),
        "",
        "## Architecture",
        f"- ResNet-{arch['depth']} (width {arch['width']}), variant `{arch['variant']}`",
        f"- pretrained parts: {parts}",
    ]
    if detection:
        det = config["detector"]
        body.append(f"- detector: `{det['arch']}`, {det['num_classes']} classes (background included)")
        if det.get("class_names"):
            body.append(f"- class names: {', '.join(det['class_names'])}")
    body += [
        "",
        "## Usage",
        "```python",
        "import insloc_hub",
        f"model = insloc_hub.from_pretrained({json.dumps(config.get('repo_id') or name)})",
    ]
    if not detection:
        body.append('detector = insloc_hub.build_detector("faster_rcnn_fpn", class_names=["cat"], pretrained=model)')
    body += [
        "```",
        "",
        "## Preprocessing",
        f"RGB, values in [0, 1], normalised with mean {config['preprocessing']['mean']} and std "
        f"{config['preprocessing']['std']} (detectors normalise internally).",
        "",
        "## Training",
    ]
    if provenance:
        body += [f"- {k}: {_one_line(v)}" for k, v in provenance.items() if not isinstance(v, (dict, list))]
    else:
        body.append("- not recorded")
    body += _diagnostics_lines(provenance.get("diagnostics"))
    if config.get("results"):
        body += ["", "## Results", "", "| dataset | metric | value |", "|---|---|---|"]
        for result in config["results"]:
            for metric, value in _metrics(result).items():
                body.append(f"| {result.get('dataset', '')} | {metric} | {value} |")
    weights = config["weights"]
    body += ["", "## Weights", f"`model.safetensors`, sha256 `{weights['sha256']}`, "
             f"{weights['num_parameters']:,} parameters.", "", "## Citation", "```bibtex", CITATION, "```", ""]
    return front + "\n\n" + "\n".join(body)
