"""Clinical FL: eICU in-hospital mortality across hospitals (preparation, the training script, baselines)."""
