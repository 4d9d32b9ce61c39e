"""insloc-hub: InsLoc detection-pretrained backbones as an installable library.

Example:
    >>> import insloc_hub
    >>> detector = insloc_hub.build_detector("faster_rcnn_fpn", class_names=["raccoon"], preset="tiny-fpn")
"""

from insloc_hub.detectors import ARCHITECTURES, LoadReport, build_detector
from insloc_hub.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    HubAccessError,
    InsLocError,
    IntegrityError,
    InvalidImageError,
    ModelNotFoundError,
    WeightsMismatchError,
)
from insloc_hub.models import BackboneConfig, InsLocBackbone
from insloc_hub.pretrained import from_pretrained, push_to_hub, save_pretrained
from insloc_hub.version import __version__

__all__ = [
    "ARCHITECTURES", "BackboneConfig", "CheckpointError", "ConfigError", "DatasetError", "HubAccessError",
    "IntegrityError", "InsLocBackbone", "InsLocError", "InvalidImageError",
    "LoadReport", "ModelNotFoundError", "WeightsMismatchError", "__version__", "build_detector", "from_pretrained",
    "push_to_hub", "save_pretrained",
]
