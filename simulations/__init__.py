"""Simulation harness: scenario presets and whole federations on one machine."""
