"""sharpscope: sharpness-aware training (ZSharp, SAM, ASAM, Friendly-SAM) and sharpness analysis.

The public API is re-exported here (see DESIGN.md); importing changes no global state.
"""

from ._version import __version__

__all__ = ["__version__"]
