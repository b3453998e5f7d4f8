"""The `funnel` command line (placeholder, being written)."""
import click


@click.group()
def main() -> None:
    """funnel-hpc: GA4GH TES gateway."""


try:  # the worker package provides its own command group
    from worker.cli import worker as _worker_group
    main.add_command(_worker_group)
except ImportError:  # pragma: no cover - during development only
    pass

if __name__ == "__main__":
    main()
