"""Algorithmic MIL unit tests (Raff & Holt, NeurIPS 2023) and MIL property checks for any model."""
