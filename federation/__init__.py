"""medfed shared core: config, data, models, privacy, training and metrics (no Flower app code)."""
