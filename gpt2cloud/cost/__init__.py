"""Recipes, GPU and price tables, calibration points and the estimate: plain arithmetic, no torch, SkyPilot or boto3."""
