"""CLI commands: each module has ``register(subparsers, parent)``."""
