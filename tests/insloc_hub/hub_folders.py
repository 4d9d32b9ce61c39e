"""Helpers of the hardening tests: copy the ``template`` hub folder (tests/insloc_hub/conftest.py), edit it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path


def copy_folder(template: Path, folder: Path) -> Path:
    shutil.copytree(template, folder)
    return folder


def edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    """Apply ``edit`` to the folder's config.json in place."""
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
