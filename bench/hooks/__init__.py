"""Built-in trial callbacks (extra evaluations, drift statistics, attestations), registered by name."""
