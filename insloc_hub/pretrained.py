"""Save and load hub folders: ``model.safetensors`` + ``config.json`` + ``README.md``.

``save_pretrained`` writes the folder described in docs/design.md; ``from_pretrained`` resolves a
name (alias, Hub repo id, ``repo@revision`` or local folder, see :mod:`insloc_hub.hub`), checks the
weights against config.json's sha256 and loads them strictly, memory-mapped with safetensors and
never with pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from insloc_hub.card import render_card
from insloc_hub.detectors import (
    PART_PREFIXES,
    DetectorConfig,
    LoadReport,
    build_detector_from_config,
    inference_options,
)
from insloc_hub.errors import ConfigError, IntegrityError, WeightsMismatchError
from insloc_hub.hub import resolve_model_dir
from insloc_hub.models import BackboneConfig, InsLocBackbone
from insloc_hub.models.init_control import skip_init
from insloc_hub.transforms import PREPROCESSING
from insloc_hub.version import __version__

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
_VERIFIED_RECORD = "verified-weights.json"


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    results: list[dict[str, Any]] | None = None,
    license: str = "apache-2.0",
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``model`` as a hub folder and return its path.

    Args:
        model: an :class:`InsLocBackbone`, or a detector from :func:`insloc_hub.build_detector`.
        directory: target folder (created; existing hub files in it are replaced).
        name: display name for the card (default: the folder name).
        provenance: how it was made (recipe, epochs, data, ...); stored in config.json and the card.
        results: evaluation results, ``[{"dataset": "voc07", "metrics": {"AP": 55.1}}]``; they become
            the card's model-index.
        license: SPDX-style licence id for the card.
        extra_files: more files to copy in (``{"metrics.jsonl": path}``), listed in config.json.
        repo_id: the Hub repo the folder is meant for (used in the card's usage snippet).

    A model loaded with :func:`from_pretrained` keeps its name, provenance and results when saved
    again, unless new ones are given.

    Example:
        >>> save_pretrained(InsLocBackbone("tiny-fpn"), "out/tiny")  # doctest: +SKIP
        PosixPath('out/tiny')
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    det_config: DetectorConfig | None = getattr(model, "insloc_config", None)
    unsaved = det_config.unsaved_options if det_config is not None else None
    if unsaved:
        raise ConfigError(f"cannot save detector options {unsaved} to config.json (not JSON values); rebuild the "
                          "detector with plain-value options so that from_pretrained can reproduce it")
    previous = getattr(model, "hub_config", None) or {}
    config = _model_config(model)
    config.update(
        name=name or previous.get("name") or directory.resolve().name,
        license=license,
        provenance={**previous.get("provenance", {}), "code": f"insloc-hub {__version__}", **dict(provenance or {})},
        results=list(results if results is not None else previous.get("results", [])),
    )
    if repo_id or previous.get("repo_id"):
        config["repo_id"] = repo_id or previous["repo_id"]
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    files = [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME]
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as staging:
        staging_dir = Path(staging)
        save_file(state, str(staging_dir / WEIGHTS_NAME), metadata={"format": "pt", "library": "insloc-hub"})
        config["weights"] = {
            "file": WEIGHTS_NAME,
            "sha256": sha256_file(staging_dir / WEIGHTS_NAME),
            "num_tensors": len(state),
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }
        for file_name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging_dir / file_name)
            files.append(file_name)
        config["files"] = files
        (staging_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (staging_dir / CARD_NAME).write_text(render_card(config))
        # the weights go last, so an interrupted save never leaves new weights beside an old config
        mode = 0o666 & ~_umask()  # readable like any file the user writes (temporary files are 0600)
        for file_name in [f for f in files if f != WEIGHTS_NAME] + [WEIGHTS_NAME]:
            os.chmod(staging_dir / file_name, mode)
            os.replace(staging_dir / file_name, directory / file_name)
    return directory


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _model_config(model: nn.Module) -> dict[str, Any]:
    base: dict[str, Any] = {"library": "insloc-hub", "format_version": FORMAT_VERSION,
                            "preprocessing": {**PREPROCESSING, "normalization": "caller"}}
    if isinstance(model, InsLocBackbone):
        return {**base, "task": "backbone", "architecture": model.config.to_dict(),
                "pretrained_parts": list(model.config.parts), "features": model.feature_info,
                "embedding_dim": model.embedding_dim}
    det_config = getattr(model, "insloc_config", None)
    if det_config is None:
        raise ConfigError(
            f"cannot save a {type(model).__name__}: expected an InsLocBackbone or a detector from build_detector"
        )
    report: LoadReport | None = getattr(model, "load_report", None)
    if report is not None:  # the parts that came from a pretrained backbone, as loaded
        parts = [p for p, prefix in PART_PREFIXES.items() if any(k.startswith(prefix) for k in report.loaded)]
    else:  # a detector loaded from a hub folder keeps what its folder recorded
        parts = list(getattr(model, "hub_config", {}).get("pretrained_parts", []))
    features = InsLocBackbone(BackboneConfig.from_dict(det_config.backbone)).feature_info
    detector = det_config.to_dict()
    detector["inference"] = inference_options(model)  # what the modules do now, whoever changed them
    if detector["norm"] == "sync":
        detector["norm"] = "bn"  # same tensors; SyncBatchNorm would need a process group to run
    inference = detector["inference"]
    # the detector normalises inside (GeneralizedRCNNTransform): callers send RGB in [0, 1], unnormalised
    preprocessing = {**base["preprocessing"], "normalization": "model", "mean": inference["image_mean"],
                     "std": inference["image_std"],
                     "resize": {"min_size": inference["min_size"], "max_size": inference["max_size"]}}
    return {**base, "preprocessing": preprocessing, "task": "detection", "architecture": det_config.backbone,
            "pretrained_parts": parts, "features": features, "detector": detector,
            "class_names": det_config.class_names}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a hub folder's config.json, with a clear error if it is not an insloc-hub folder."""
    path = Path(folder) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict) or config.get("library") != "insloc-hub" or "architecture" not in config:
        raise ConfigError(f"{path} is not an insloc-hub config (no 'library': 'insloc-hub' / 'architecture')")
    version = config.get("format_version", 1)
    if not isinstance(version, int):
        raise ConfigError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ConfigError(f"{path} has format_version {version}; upgrade insloc-hub to read it")
    weights = config.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("file", WEIGHTS_NAME), str):
        raise ConfigError(f"{path} has no 'weights' record (file, sha256); re-save the model with save_pretrained")
    task = config.get("task", "backbone")
    if task not in ("backbone", "detection"):
        raise ConfigError(f"{path} has unknown task {task!r}; expected 'backbone' or 'detection'")
    if task == "detection" and not isinstance(config.get("detector"), dict):
        raise ConfigError(f"{path} is a detection folder without its 'detector' section; re-save the detector")
    if not isinstance(config["architecture"], dict):
        raise ConfigError(f"{path}: 'architecture' must be an object")
    return config


def verify_weights(folder: str | os.PathLike[str], config: Mapping[str, Any], *, always: bool = False) -> None:
    """Check the weights file against config.json's sha256.

    A file already verified (same path, size, mtime and inode) is not hashed again unless
    ``always``: the record lives in ``$INSLOC_HUB_CACHE`` (default ``~/.cache/insloc_hub``).

    Raises:
        IntegrityError: the hashes differ (a tampered or corrupted download).
    """
    path = Path(folder) / config.get("weights", {}).get("file", WEIGHTS_NAME)
    expected = config.get("weights", {}).get("sha256")
    if not expected:
        raise IntegrityError(f"{Path(folder) / CONFIG_NAME} records no sha256 for {path.name}; re-save the model")
    real = path.resolve()
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    record_path = Path(os.environ.get("INSLOC_HUB_CACHE", Path.home() / ".cache" / "insloc_hub")) / _VERIFIED_RECORD
    record = _read_record(record_path)
    if not always and record.get(key) == expected:
        return
    actual = sha256_file(real)
    if actual != expected:
        raise IntegrityError(
            f"{path} has sha256 {actual} but config.json records {expected}: the file is corrupted or was "
            "modified. Delete it and download again (insloc-hub download NAME)."
        )
    record[key] = expected
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(list(record.items())[-256:])))
        os.replace(tmp, record_path)
    except OSError:  # a read-only home only costs a re-hash next time
        pass


def _read_record(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_state(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu", file_name: str = WEIGHTS_NAME,
) -> dict[str, torch.Tensor]:
    """The weights of a hub folder as a state dict (safetensors, memory-mapped)."""
    path = Path(folder) / file_name
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except FileNotFoundError as exc:
        raise IntegrityError(f"{path} is missing; download the model again (insloc-hub download NAME)") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        raise IntegrityError(f"cannot read {path} as safetensors ({exc}); the file is corrupt or truncated: "
                             "download it again") from exc


def _check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{source} does not match its architecture config:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                lines.append(f"  {len(keys)} {title}: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")
        lines.append("Pass strict=False to load what fits, or check that config.json belongs to these weights.")
        raise WeightsMismatchError("\n".join(lines))


def from_pretrained(
    name: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
    namespace: str | None = None,
    token: str | bool | None = None,
    verify: bool | str = "auto",
) -> nn.Module:
    """Load a backbone bundle or a fine-tuned detector from an alias, Hub repo or local folder.

    Args:
        name: ``"insloc-r50"`` (alias), ``"owner/repo"``, ``"owner/repo@revision"`` or a folder path.
        revision: branch, tag or commit (alternative to ``@revision``).
        cache_dir: Hugging Face cache to use (default: huggingface_hub's).
        local_files_only: never touch the network (``HF_HUB_OFFLINE=1`` does the same).
        device: where the weights are loaded (``"cpu"``, ``"cuda"``, ``torch.device``...).
        dtype: cast floating-point weights (``torch.bfloat16`` or ``"bfloat16"``).
        strict: every tensor of the file must fit the architecture and vice versa.
        namespace: Hub namespace for aliases (default ``insloc-hub`` or ``$INSLOC_HUB_NAMESPACE``).
        token: Hub token for private repos.
        verify: ``"auto"`` checks sha256 once per file version, ``True`` always, ``False`` never.

    Returns:
        An :class:`InsLocBackbone` in eval mode (``task: backbone``) or a torchvision detector in eval
        mode (``task: detection``), with ``model.hub_config`` holding config.json.

    Example:
        >>> backbone = from_pretrained("insloc-r50")  # doctest: +SKIP
        >>> detector = from_pretrained("me/raccoon-detector@v1", device="cuda")  # doctest: +SKIP
    """
    device, dtype = _parse_device(device), _parse_dtype(dtype)
    folder = resolve_model_dir(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                               namespace=namespace, token=token)
    config = read_config(folder)
    if verify:
        verify_weights(folder, config, always=verify is True)
    weights_file = config["weights"].get("file", WEIGHTS_NAME)
    state = load_state(folder, device, weights_file)
    source = f"{folder / weights_file}"
    if config.get("task") == "detection":
        model = build_detector_from_config(config["detector"])
        if strict:
            _check_keys(model, state, source)
        else:
            _drop_unusable(model, state)
        model.load_state_dict(state, strict=False)
    else:
        arch = BackboneConfig.from_dict(config["architecture"])
        with skip_init():  # no random init: every tensor comes from the file
            model = InsLocBackbone(arch)
        if strict:
            _check_keys(model, state, source)
        else:
            _initialise_missing(model, state)
        model.load_state_dict(state, strict=False, assign=True)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.hub_config = config
    model.hub_folder = folder
    return model.eval()


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:1', 'mps'...") from exc


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    parsed = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(parsed, torch.dtype) or not parsed.is_floating_point:
        raise ConfigError(f"unknown floating-point dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    return parsed


def _drop_unusable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """strict=False for detectors: skip tensors that do not fit; the model keeps its fresh init there."""
    expected = model.state_dict()
    skipped = [k for k in state if k not in expected or state[k].shape != expected[k].shape]
    for key in skipped:
        del state[key]
    missing = [k for k in expected if k not in state]
    if skipped or missing:
        logger.warning("strict=False: skipped %d tensors that do not fit (%s); %d tensors keep a fresh init (%s)",
                       len(skipped), ", ".join(skipped[:6]), len(missing), ", ".join(missing[:6]))


def _initialise_missing(model: InsLocBackbone, state: dict[str, torch.Tensor]) -> None:
    """With strict=False, tensors absent from the file (or misshapen) get a proper fresh init."""
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    for key in [k for k in state if k not in expected or state[k].shape != expected[k].shape]:
        del state[key]
    if bad:
        fresh = InsLocBackbone(model.config).state_dict()
        state.update({k: fresh[k] for k in bad})
        logger.warning("strict=False: %d tensors were not usable from the file and keep a fresh initialisation: %s",
                       len(bad), ", ".join(bad[:8]))


def timed_load(name: str, **kwargs: Any) -> tuple[nn.Module, float]:
    """``from_pretrained`` and the seconds it took (used by the load benchmark and ``insloc-hub info``)."""
    start = time.perf_counter()
    model = from_pretrained(name, **kwargs)
    return model, time.perf_counter() - start


def push_to_hub(
    model_or_directory: nn.Module | str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    **save_kwargs: Any,
) -> str:
    """Publish a model (saved first with :func:`save_pretrained`) or a hub folder; return the commit id.

    Example:
        >>> push_to_hub("runs/insloc/final", "me/insloc-r50-fpn", revision="v1")  # doctest: +SKIP
        '1f0c...'
    """
    from insloc_hub.hub import parse_model_name, push_folder_to_hub

    kwargs = dict(revision=revision, private=private, token=token, commit_message=commit_message, create_pr=create_pr)
    target = parse_model_name(repo_id.split("@")[0]).repo_id or repo_id.split("@")[0]
    with tempfile.TemporaryDirectory(prefix="insloc-push-") as staging:
        staged = Path(staging) / target.split("/")[-1]
        if isinstance(model_or_directory, nn.Module):
            save_pretrained(model_or_directory, staged, repo_id=target, **save_kwargs)
        else:
            _stage_folder(Path(model_or_directory), staged, target)
        return push_folder_to_hub(staged, repo_id, **kwargs)


def _stage_folder(folder: Path, staged: Path, repo_id: str) -> None:
    """Link the folder's hub files into ``staged`` with config.json and the card naming ``repo_id``.

    Only the files config.json lists travel (never checkpoints or half-written saves lying beside
    them), and the user's folder is left untouched.
    """
    config = read_config(folder)
    staged.mkdir(parents=True)
    for file_name in config.get("files", [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME]):
        if file_name in (CONFIG_NAME, CARD_NAME):
            continue
        source = (folder / file_name).resolve()
        if not source.is_file():
            raise ConfigError(f"{folder / file_name} is listed in config.json but missing; re-save the model")
        (staged / file_name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, staged / file_name)
    config["repo_id"] = repo_id
    (staged / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (staged / CARD_NAME).write_text(render_card(config))
