"""Save and load hub folders: ``model.safetensors`` + ``config.json`` + ``README.md``.

``save_pretrained`` writes the folder described in docs/design.md; ``from_pretrained`` resolves a
name (alias, Hub repo id, ``repo@revision`` or local folder, see :mod:`insloc_hub.hub`), checks the
weights against config.json's sha256 and loads them strictly, memory-mapped with safetensors and
never with pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from insloc_hub.card import render_card
from insloc_hub.detectors import (
    MAX_NUM_CLASSES,
    PART_PREFIXES,
    SIZE_OPTIONS,
    DetectorConfig,
    LoadReport,
    build_detector_from_config,
    check_class_names,
    inference_options,
    size_option_problem,
)
from insloc_hub.errors import (
    ConfigError,
    InsLocError,
    IntegrityError,
    ModelNotFoundError,
    WeightsMismatchError,
    reworded,
)
from insloc_hub.hub import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_local_folder,
    is_hex_digest,
    push_folder_to_hub,
    push_target,
    read_json_object,
    required_files,
    resolve_model_dir,
)
from insloc_hub.models import BackboneConfig, InsLocBackbone
from insloc_hub.transforms import PREPROCESSING
from insloc_hub.version import __version__

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
FORMAT_VERSION = 1
_VERIFIED_RECORD = "verified-weights.json"
#: integer architecture fields of config.json and their accepted ranges (BackboneConfig's limits)
ARCHITECTURE_RANGES = {f.name: (f.metadata["min"], f.metadata["max"]) for f in dataclasses.fields(BackboneConfig)
                       if "max" in f.metadata}
#: safetensors dtypes a hub folder holds: float32 tensors, int64 BatchNorm step counters
_WEIGHT_DTYPE, _COUNTER_DTYPE = "F32", "I64"


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
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a hub folder and return its path.

    Args:
        model: an :class:`InsLocBackbone`, or a detector from :func:`insloc_hub.build_detector`.
        directory: target folder (created). A hub folder of the same task whose files this save
            all rewrites is replaced; anything else it would replace or leave stale (another kind of
            model, another program's config.json, a listed file this save does not write) needs
            ``overwrite``. Files no config.json lists are left alone.
        name: display name for the card (default: the folder name).
        provenance: how it was made (recipe, epochs, data, ...); stored in config.json and the card.
        results: evaluation results, ``[{"dataset": "voc07", "metrics": {"AP": 55.1}}]``; they become
            the card's model-index.
        license: SPDX-style licence id for the card.
        extra_files: more files to copy in (``{"metrics.jsonl": path}``), listed in config.json.
        repo_id: the Hub repo the folder is meant for (used in the card's usage snippet).
        overwrite: replace whatever model the folder holds, and remove the files its config.json
            listed that the new one does not (no stale file stays beside the new model).

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
    for file_name in extra_files or {}:
        _plain_file_name(file_name, "extra_files", "save_pretrained")
    stale = _previous_model_files(directory, config["task"], files + list(extra_files or {}), overwrite)
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
        (staging_dir / CARD_NAME).write_text(render_card(config, folder=directory))
        # the weights go last, so an interrupted save never leaves new weights beside an old config
        mode = default_file_mode()
        for file_name in [f for f in files if f != WEIGHTS_NAME] + [WEIGHTS_NAME]:
            os.chmod(staging_dir / file_name, mode)
            os.replace(staging_dir / file_name, directory / file_name)
    for file_name in stale:  # after the new model is in place: an interrupted save never leaves a folder without one
        _remove_inside(directory, file_name)
    return directory


def _previous_model_files(directory: Path, task: str, files: list[str], overwrite: bool) -> list[str]:
    """The files the folder's previous model lists that this save does not write (to remove after it).

    Without ``overwrite`` a save replaces only a hub folder of the same task whose files it all
    rewrites; anything else (another kind of model, another program's config.json, files the save
    would leave stale or overwrite unlisted) is a ConfigError that says so.
    """
    config_path = directory / CONFIG_NAME
    how = "Choose another folder, delete this one, or pass overwrite=True to replace it"
    if not config_path.exists():
        clobbered = [f for f in files if (directory / f).exists()]
        if clobbered and not overwrite:
            raise ConfigError(f"{directory} holds {', '.join(clobbered)} but no {CONFIG_NAME}, so they are not a hub "
                              f"folder's: saving would replace them. {how}.")
        return []
    try:
        previous = read_json_object(config_path)
        listed = required_files(previous, source=str(config_path))
    except ConfigError:
        previous, listed = {}, []
    if previous.get("library") != "insloc-hub":
        if not overwrite:
            raise ConfigError(f"{config_path} is not a hub folder's config.json (a training run's, or another "
                              f"program's): saving a model there would replace it. {how}.")
        return []
    previous_task = previous.get("task", "backbone")
    stale = sorted(set(listed) - set(files))
    if overwrite:
        return stale
    if previous_task != task:
        raise ConfigError(f"{directory} holds a {previous_task} model ({previous.get('name')!r}); saving a {task} "
                          f"model there would replace it. {how}.")
    if stale:
        raise ConfigError(f"{directory} holds a model that also lists {', '.join(stale)}, which this save does not "
                          f"write: they would stay beside the new model, describing the old one. {how} and remove "
                          "them.")
    return []


def _remove_inside(directory: Path, file_name: str) -> None:
    """Remove ``directory / file_name`` (a relative name from config.json) if it lies inside ``directory``."""
    path = directory / file_name
    root = directory.resolve()
    if root not in path.parent.resolve().parents and path.parent.resolve() != root:
        return  # a listed name under a symlinked folder: never delete outside the hub folder
    path.unlink(missing_ok=True)
    for parent in path.relative_to(directory).parents[:-1]:  # folders the listed name made, if now empty
        with contextlib.suppress(OSError):
            (directory / parent).rmdir()


def default_file_mode() -> int:
    """``0o666`` less the process umask: the mode of a file the user writes normally (temporary files are 0600).

    The umask is read without changing it (``os.umask`` would race with other threads).
    """
    umask = 0o022
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
                break
    except OSError:
        pass
    return 0o666 & ~umask


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
    features = InsLocBackbone(BackboneConfig.from_dict(det_config.architecture)).feature_info
    detector = det_config.to_dict()
    detector["inference"] = inference_options(model)  # what the modules do now, whoever changed them
    if detector["norm"] == "sync":
        detector["norm"] = "bn"  # same tensors; SyncBatchNorm would need a process group to run
    inference = detector["inference"]
    # the detector normalises inside (GeneralizedRCNNTransform): callers send RGB in [0, 1], unnormalised
    preprocessing = {**base["preprocessing"], "normalization": "model", "mean": inference["image_mean"],
                     "std": inference["image_std"],
                     "resize": {"min_size": inference["min_size"], "max_size": inference["max_size"]}}
    return {**base, "preprocessing": preprocessing, "task": "detection", "architecture": det_config.architecture,
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
    """Parse and validate a hub folder's config.json, before anything is built or allocated.

    Checked: size (at most ``hub.MAX_CONFIG_BYTES``), UTF-8, JSON (nesting included), the
    insloc-hub markers, ``weights.file`` (a plain file name in the folder), ``files`` (relative
    names inside it), and every value used to build a model (:data:`ARCHITECTURE_RANGES`,
    ``num_classes`` up to :data:`~insloc_hub.detectors.MAX_NUM_CLASSES`, image sizes as
    :func:`~insloc_hub.detectors.size_option_problem` says, distinct class names) or to
    feed it (``preprocessing.mean``/``std`` and ``detector.options.image_mean``/``image_std``: 3 finite
    numbers, std > 0; ``embedding_dim``: the architecture's).

    Raises:
        ConfigError: naming the field and the accepted values.
    """
    path = Path(folder) / CONFIG_NAME
    config = read_json_object(path)
    if config.get("library") != "insloc-hub" or "architecture" not in config:
        raise ConfigError(f"{path} is not an insloc-hub config (no 'library': 'insloc-hub' / 'architecture')")
    version = config.get("format_version", 1)
    if not _is_int(version):
        raise ConfigError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ConfigError(f"{path} has format_version {version}; upgrade insloc-hub to read it")
    weights = config.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("file", WEIGHTS_NAME), str):
        raise ConfigError(f"{path} has no 'weights' record (file, sha256); re-save the model with save_pretrained")
    _plain_file_name(weights.get("file", WEIGHTS_NAME), "weights.file", path)
    sha = weights.get("sha256")
    if sha is not None and not is_hex_digest(sha, 64):
        raise ConfigError(f"{path}: weights.sha256 must be 64 lowercase hex digits, got {sha!r}")
    if "files" in config:
        required_files(config, source=str(path))  # relative names inside the folder only
    task = config.get("task", "backbone")
    if task not in ("backbone", "detection"):
        raise ConfigError(f"{path} has unknown task {task!r}; expected 'backbone' or 'detection'")
    if task == "detection" and not isinstance(config.get("detector"), dict):
        raise ConfigError(f"{path} is a detection folder without its 'detector' section; re-save the detector")
    if not isinstance(config["architecture"], dict):
        raise ConfigError(f"{path}: 'architecture' must be an object")
    _check_architecture(config["architecture"], "architecture", path)
    if "preprocessing" in config:
        _check_preprocessing(config["preprocessing"], path)
    if "embedding_dim" in config:
        _check_embedding_dim(config["embedding_dim"], config["architecture"], path)
    if task == "detection":
        _check_detector(config["detector"], path)
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain_file_name(value: Any, field: str, source: Any) -> str:
    """``value`` if it names a file directly in the folder (no folder part, not '.' or '..')."""
    if (not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value
            or "\0" in value or ":" in value):
        raise ConfigError(f"{source}: {field} must be a plain file name inside the folder, got {value!r}")
    return value


def _require(ok: bool, source: Any, field: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{source}: {field} must be {what}, got {value!r}")


def _check_int(value: Any, field: str, low: int, high: int, source: Any) -> None:
    _require(_is_int(value) and low <= value <= high, source, field, f"an integer in [{low}, {high}]", value)


def _is_list_of_str(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_architecture(arch: Mapping[str, Any], prefix: str, source: Any) -> None:
    for name, (low, high) in ARCHITECTURE_RANGES.items():
        if name in arch:
            _check_int(arch[name], f"{prefix}.{name}", low, high, source)
    _require(isinstance(arch.get("variant", ""), str), source, f"{prefix}.variant", "a string", arch.get("variant"))
    parts = arch.get("parts")
    _require(parts is None or _is_list_of_str(parts), source, f"{prefix}.parts", "a list of names", parts)


def _check_channel_stats(value: Any, field: str, source: Any, *, positive: bool) -> None:
    """Per-channel mean/std: a list of 3 finite numbers (std > 0: the graph divides by it)."""
    ok = (isinstance(value, list) and len(value) == 3
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
          and (not positive or all(v > 0 for v in value)))
    _require(ok, source, field, f"a list of 3 finite numbers{' > 0' if positive else ''} (one per RGB channel)",
             value)


def _check_preprocessing(preprocessing: Any, source: Any) -> None:
    _require(isinstance(preprocessing, dict), source, "preprocessing", "an object", preprocessing)
    for name in ("mean", "std"):
        if name in preprocessing:
            _check_channel_stats(preprocessing[name], f"preprocessing.{name}", source, positive=name == "std")


def _check_embedding_dim(value: Any, architecture: Mapping[str, Any], source: Any) -> None:
    """``embedding_dim`` is the pooled C5 width the architecture (which the weights are loaded against) gives."""
    try:
        expected = BackboneConfig.from_dict(architecture).stage_channels[3]
    except ConfigError:  # the architecture's own error is raised when the model is built
        return
    _require(_is_int(value) and value == expected, source, "embedding_dim",
             f"{expected} (the C5 channels of the architecture and its weights)", value)


def _check_detector(detector: Mapping[str, Any], source: Any) -> None:
    if "num_classes" in detector:
        _check_int(detector["num_classes"], "detector.num_classes", 1, MAX_NUM_CLASSES, source)
    if detector.get("class_names") is not None:
        check_class_names(detector["class_names"], "detector.class_names", source)
    for name in ("arch", "norm"):
        _require(isinstance(detector.get(name, ""), str), source, f"detector.{name}", "a string", detector.get(name))
    field = "architecture" if "architecture" in detector else "backbone"  # its name in insloc-hub 0.1
    architecture = detector.get(field, {})
    _require(isinstance(architecture, dict), source, f"detector.{field}", "an object", architecture)
    _check_architecture(architecture, f"detector.{field}", source)
    options = detector.get("options", {})
    _require(isinstance(options, dict), source, "detector.options", "an object", options)
    for name in SIZE_OPTIONS:
        problem = size_option_problem(name, options[name]) if name in options else None
        _require(problem is None, source, f"detector.options.{name}", str(problem), options.get(name))
    for name in ("image_mean", "image_std"):  # the detector normalises with these inside
        if name in options:
            _check_channel_stats(options[name], f"detector.options.{name}", source, positive=name == "image_std")
    for name, value in options.items():
        finite = math.isfinite(value) and value >= 0 if isinstance(value, (int, float)) else True
        _require(finite, source, f"detector.options.{name}", "a finite number >= 0", value)


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{key: {"dtype", "shape"}}`` of a safetensors file, from its header only.

    The file must be a regular file (never ``/dev/zero`` or a FIFO, which would hash forever) and
    safetensors must accept the header, which includes a size exactly that of the header and data.

    Raises:
        IntegrityError: not a regular file, a malformed header, or a size that does not match.
    """
    path = Path(path)
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError as exc:
        raise IntegrityError(f"{path} is missing; download the model again (insloc-hub download NAME)") from exc
    if not regular:
        raise IntegrityError(f"{path} is not a regular file; a hub folder's weights must be a plain file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: {"dtype": f.get_slice(k).get_dtype(), "shape": f.get_slice(k).get_shape()} for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise IntegrityError(f"{path} is not a safetensors file of the size its header describes ({exc}): it is "
                             "corrupt, truncated or has extra bytes; download it again") from exc


def _check_dtypes(header: Mapping[str, Mapping[str, Any]], source: Any) -> None:
    """WeightsMismatchError naming the first tensor that is not float32 (int64 for BatchNorm counters)."""
    for key, entry in header.items():
        wanted = _COUNTER_DTYPE if key.endswith("num_batches_tracked") else _WEIGHT_DTYPE
        if entry["dtype"] != wanted:
            raise WeightsMismatchError(
                f"{source}: tensor {key!r} is {entry['dtype']}, but a hub folder holds {wanted} there (float32 "
                "weights and buffers, int64 BatchNorm counters). Re-save the model with save_pretrained; pass "
                "dtype= to from_pretrained to get another precision."
            )


_REDOWNLOAD = "Delete it and download again (insloc-hub download NAME)."


def verify_weights(folder: str | os.PathLike[str], config: Mapping[str, Any], *,
                   always: bool = False, advice: str = _REDOWNLOAD) -> dict[str, dict[str, Any]]:
    """Check the weights file against config.json's sha256.

    A file already verified (same path, size, mtime, ctime and inode) is not hashed again unless
    ``always``: the record lives in ``$INSLOC_HUB_CACHE`` (default ``$XDG_CACHE_HOME/insloc_hub``, else
    ``~/.cache/insloc_hub``). ``advice`` ends the message of a mismatch (default: download it again).

    Returns:
        The weights file's header (:func:`read_safetensors_header`), checked before hashing.

    Raises:
        IntegrityError: the hashes differ (a tampered or corrupted download).
    """
    name = _plain_file_name(config.get("weights", {}).get("file", WEIGHTS_NAME), "weights.file", CONFIG_NAME)
    path = Path(folder) / name
    expected = config.get("weights", {}).get("sha256")
    if not expected:
        raise IntegrityError(f"{Path(folder) / CONFIG_NAME} records no sha256 for {path.name}; re-save the model")
    header = read_safetensors_header(path)  # a regular file of the size its header says, before hashing it
    real = path.resolve()
    info = real.stat()
    # st_ctime_ns changes on every write and cannot be set back by the user (unlike mtime)
    key = f"{real}|{info.st_size}|{info.st_mtime_ns}|{info.st_ctime_ns}|{info.st_ino}"
    default_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "insloc_hub"
    record_path = Path(os.environ.get("INSLOC_HUB_CACHE") or default_cache) / _VERIFIED_RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):  # none yet, or damaged: it only saves re-hashing
        record = {}
    if not always and record.get(key) == expected:
        return header
    actual = sha256_file(real)
    if actual != expected:
        raise IntegrityError(
            f"{path} has sha256 {actual} but config.json records {expected}: the file is corrupted or was "
            f"modified. {advice}"
        )
    record[key] = expected
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(list(record.items())[-256:])))
        os.replace(tmp, record_path)
    except OSError:  # a read-only home only costs a re-hash next time
        pass
    return header


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
    weights_file = config["weights"].get("file", WEIGHTS_NAME)
    source = f"{folder / weights_file}"
    if verify:
        header = verify_weights(folder, config, always=verify is True)
    else:
        header = read_safetensors_header(folder / weights_file)
    _check_dtypes(header, source)
    if config.get("task") == "detection":
        model = build_detector_from_config(config["detector"])
    else:  # strict: no random init, every tensor comes from the file; else what the file lacks keeps its init
        with torch.device("meta") if strict else contextlib.nullcontext():
            model = InsLocBackbone(BackboneConfig.from_dict(config["architecture"]))
    if strict:  # keys and shapes from the header: nothing is read if they do not fit
        given = {key: torch.empty(entry["shape"], device="meta") for key, entry in header.items()}
        WeightsMismatchError.check(model.state_dict(), given, f"{source} does not match its architecture config:",
                                   "Pass strict=False to load what fits, or check that config.json belongs to these "
                                   "weights.")
    state = load_file(folder / weights_file, device=str(device))
    if not strict:
        state = _what_fits(model, state)
    model.load_state_dict(state, strict=strict, assign=isinstance(model, InsLocBackbone))
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


def _what_fits(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """strict=False: the file's tensors that fit the model (the others are logged, as are the model's left out)."""
    expected = model.state_dict()
    fits = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    skipped = [k for k in state if k not in fits]
    missing = [k for k in expected if k not in fits]
    if skipped or missing:
        logger.warning("strict=False: skipped %d tensors that do not fit (%s); %d tensors keep a fresh init (%s)",
                       len(skipped), ", ".join(skipped[:6]), len(missing), ", ".join(missing[:6]))
    return fits


def push_to_hub(model_or_directory: nn.Module | str | os.PathLike[str], repo_id: str, **options: Any) -> str:
    """Publish a model (saved first with :func:`save_pretrained`) or a hub folder; return the commit id.

    ``options`` go to :func:`~insloc_hub.hub.push_folder_to_hub` (``revision``, ``private``, ``token``,
    ``commit_message``, ``create_pr``...) and, for a model, the rest to :func:`save_pretrained`
    (``provenance``, ``results``...). config.json and the card are written naming ``repo_id``; the
    user's folder is left untouched, and only the files its config.json lists travel. A folder's
    weights are checked against config.json's sha256 first: :class:`IntegrityError`, nothing uploaded.

    Example:
        >>> push_to_hub("runs/insloc/final", "me/insloc-r50-fpn", revision="v1")  # doctest: +SKIP
        '1f0c...'
    """
    push_names = inspect.signature(push_folder_to_hub).parameters
    push_options = {k: v for k, v in options.items() if k in push_names}
    save_options = {k: v for k, v in options.items() if k not in push_names}
    target, _ = push_target(repo_id, options.get("revision"), options.get("namespace"))
    with tempfile.TemporaryDirectory(prefix="insloc-push-") as staging:
        staged = Path(staging) / target.split("/")[-1]
        if isinstance(model_or_directory, nn.Module):
            save_pretrained(model_or_directory, staged, repo_id=target, **save_options)
            shown = f"the {type(model_or_directory).__name__} (saved for the push)"
        elif save_options:
            raise ConfigError(f"push_to_hub of a folder takes no {sorted(save_options)}; those are for a model")
        else:
            shown = str(Path(model_or_directory).expanduser())
            _stage_folder(Path(model_or_directory).expanduser(), staged, target)
        try:
            return push_folder_to_hub(staged, repo_id, **push_options)
        except InsLocError as exc:  # the staging copy is gone when the user reads this: name what they gave
            raise reworded(exc, str(exc).replace(str(staged), shown)) from exc


def _stage_folder(folder: Path, staged: Path, repo_id: str) -> None:
    """Link the folder's listed files into ``staged``, with config.json and the card naming ``repo_id``.

    The folder must be a complete hub folder whose weights match config.json's sha256: a folder
    edited after it was saved is refused here, before it reaches the Hub where every download of
    it would fail the same check.
    """
    if not folder.is_dir():
        raise ModelNotFoundError(f"Cannot push {str(folder)!r}: no such folder.")
    check_local_folder(folder)  # config.json and every file it lists are there
    config = read_config(folder)
    verify_weights(folder, config, always=True, advice=(
        "Refusing to push it: re-save the model with save_pretrained (or restore the file) and push again."))
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
