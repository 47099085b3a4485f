"""LPMOS: bare-metal provisioning — the shared core (config, store, models, states)."""

__version__ = "0.1.0"
