"""Runs the user launched: the registry, reading a run back, status, fetch, logs, down, calibration, plot, report."""
