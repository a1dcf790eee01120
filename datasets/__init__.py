"""Built-in datasets, one file per family; each registers itself with ``shiftbench.registry.DATASETS``."""
