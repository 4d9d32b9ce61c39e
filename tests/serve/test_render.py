"""serve.render: the one detection filter behind /v1 lists and v2 tensors."""

from __future__ import annotations

import numpy as np

from insloc_hub.serve.backends import Detections
from insloc_hub.serve.inputs import Options
from insloc_hub.serve.render import filter_detections, select_detections

NAMES = ["cat", "dog"]
DET = Detections(boxes=np.arange(16, dtype=np.float32).reshape(4, 4) + 0.123,
                 labels=np.array([1, 2, 1, 3]), scores=np.array([0.2, 0.9, 0.5, 0.9], dtype=np.float32))


def test_threshold_classes_order_and_limit():
    # best first; equal scores keep their order
    assert select_detections(DET, Options(score_threshold=0.0), NAMES).tolist() == [1, 3, 2, 0]
    assert select_detections(DET, Options(score_threshold=0.5), NAMES).tolist() == [1, 3, 2]
    assert select_detections(DET, Options(score_threshold=0.0, classes=["cat"]), NAMES).tolist() == [2, 0]
    assert select_detections(DET, Options(score_threshold=0.0, max_detections=2), NAMES).tolist() == [1, 3]
    assert select_detections(DET, Options(score_threshold=0.0, max_detections=0), NAMES).tolist() == []


def test_v1_list_is_the_selection_rounded():
    listed = filter_detections(DET, Options(score_threshold=0.3, max_detections=0), NAMES)
    assert listed == []  # max_detections=0 means none, as in v2
    listed = filter_detections(DET, Options(score_threshold=0.3), NAMES)
    assert [d["label_id"] for d in listed] == [2, 3, 1] and [d["label"] for d in listed] == ["dog", "3", "cat"]
    assert listed[0]["score"] == 0.9 and listed[0]["box"] == {"xmin": 4.12, "ymin": 5.12, "xmax": 6.12, "ymax": 7.12}
