"""Shared run infrastructure: run folders, resume, checkpoints, seeding, metrics, distributed."""
