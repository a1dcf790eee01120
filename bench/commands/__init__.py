"""Subcommands beyond the core ones, one per module; each module defines ``register(subparsers)``."""
