"""Stage 2: fine-tuning and evaluating detectors on labelled data (COCO/VOC)."""
