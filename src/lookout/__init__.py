"""Lookout: one-process observability for microservices.

The SDK that services import lives in `lookout.sdk`; the command line is `lookout`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lookout")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
