"""From options to a started run: plan (checks only, writes nothing), build (wheel + config), task (SkyPilot),
clouds (what an infra offers), start (record the run, then hand it to its backend)."""
