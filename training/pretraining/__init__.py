"""Stage 1: InsLoc/MoCo pretraining (composition, model, loss, diagnostics, the run)."""
