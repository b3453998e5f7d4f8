"""funnel-hpc gateway: TES API, persistence, reconciler, CLI."""

from funnel_hpc.core import __version__

__all__ = ["__version__"]
