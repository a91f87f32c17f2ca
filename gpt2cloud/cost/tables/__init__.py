"""Bundled hardware tables (YAML): GPUs, prices, MFU calibration."""
