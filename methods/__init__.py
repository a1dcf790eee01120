"""Built-in methods, one per file; each registers itself with ``shiftbench.registry.METHODS``."""
