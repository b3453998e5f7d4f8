"""funnel-hpc gateway: TES API, persistence, reconciler, CLI."""

__version__ = "0.1.0"
