"""medfed ServerApp: the coordinator (aggregation, checkpoints, run records)."""
