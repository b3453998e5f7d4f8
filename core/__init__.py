"""funnel_hpc.core: what the gateway, the backends and the worker share.

The leaf layer: TES state names, the event-log format and its fold, the timestamp
format, the worker-token file, the TES HTTP client's transient rule and configuration
loading. It imports nothing else of funnel-hpc (an import-linter contract in
pyproject.toml keeps it so), and cheaply: the worker imports it at every start.
"""

__version__ = "0.2.0"
