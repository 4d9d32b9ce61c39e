"""Pretraining (InsLoc), fine-tuning and evaluation (installed as ``insloc_hub.training``)."""
