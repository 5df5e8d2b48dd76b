"""seyaha-agent: keeps Seyaha's view of a supplier's catalog and availability in step with its database."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("seyaha-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
