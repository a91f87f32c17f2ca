"""Bundled tables (YAML): GPUs, prices, MFU calibration, the bill's phases, interconnects between nodes."""
