"""OncoFed: federated multi-modal cancer classification. Entry point of the `oncofed` command."""

__version__ = "0.1.0"
