"""Figure style: venue sizes, fonts, the optimizer palette, and atomic saving.

Everything global lives inside :func:`style`, a :func:`matplotlib.rc_context`: on exit the
``rcParams`` are exactly what they were before. Plot functions read the current
``figure.figsize`` width when they create a figure, so a figure drawn inside
``with style("icml"):`` is one ICML column wide and its text is legible at print size.

Widths (inches) are the text block of each venue's LaTeX template: NeurIPS and ICLR are one-column
(5.5 in), ICML is two-column (3.25 in per column, 6.75 in across both). ``column="double"`` means
"across the whole text block"; for one-column venues both settings give the text width.

The palette is Okabe & Ito (2008), "Color universal design", which stays distinguishable under the
common colour-vision deficiencies and in greyscale (paired with markers and dashes).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .._io import atomic_output
from ..errors import UserInputError

__all__ = [
    "VENUES",
    "OPTIMIZER_COLORS",
    "optimizer_color",
    "optimizer_marker",
    "optimizer_label",
    "optimizer_key",
    "optimizer_rank",
    "style",
    "figure_width",
    "new_figure",
    "save_figure",
]

#: Okabe-Ito colours (hex), by name.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}

#: One fixed colour per optimizer, the same in every figure. ZSharp gets the strongest hue.
OPTIMIZER_COLORS: dict[str, str] = {
    "sgd": OKABE_ITO["black"],
    "adam": OKABE_ITO["sky_blue"],
    "adamw": OKABE_ITO["bluish_green"],
    "sam": OKABE_ITO["blue"],
    "asam": OKABE_ITO["reddish_purple"],
    "zsharp": OKABE_ITO["vermillion"],
    "fsam": OKABE_ITO["orange"],
}

_OPTIMIZER_MARKERS = {"sgd": "o", "adam": "v", "adamw": "^", "sam": "s", "asam": "D", "zsharp": "*", "fsam": "P"}
_OPTIMIZER_LABELS = {
    "sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "sam": "SAM", "asam": "ASAM", "zsharp": "ZSharp",
    "fsam": "F-SAM",
}
_ALIASES = {"friendlysam": "fsam", "zsam": "zsharp", "adaptivesam": "asam"}
# Colours for series that are not a known optimizer (directions, layers, ...), in a fixed order.
_EXTRA_COLORS = [OKABE_ITO[k] for k in ("blue", "vermillion", "bluish_green", "reddish_purple",
                                        "orange", "sky_blue", "black")]
_EXTRA_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]

# venue -> (single-column width, full text width) in inches, and the base font size in points.
VENUES: dict[str, dict[str, float]] = {
    "neurips": {"single": 5.5, "double": 5.5, "font": 8.0},
    "iclr": {"single": 5.5, "double": 5.5, "font": 8.0},
    "icml": {"single": 3.25, "double": 6.75, "font": 7.5},
    "paper": {"single": 3.5, "double": 7.0, "font": 8.0},
}
_GOLDEN = (5**0.5 - 1) / 2


def optimizer_key(name: str) -> str:
    """Canonical optimizer key: ``"Friendly-SAM"`` -> ``"fsam"``, ``"ZSharp (p=0.95)"`` -> ``"zsharp"``."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower().split("(")[0])
    return _ALIASES.get(key, key)


def optimizer_rank(name: str) -> int:
    """Position of optimizer ``name`` in :data:`sharpscope.optim.OPTIMIZER_ORDER` (baselines first,
    ZSharp last), for sorting runs; names that are not a known optimizer come after all of them."""
    from ..optim import OPTIMIZER_ORDER  # lazily: the order is defined once, next to the optimizers

    key = optimizer_key(name)
    return OPTIMIZER_ORDER.index(key) if key in OPTIMIZER_ORDER else len(OPTIMIZER_ORDER)


def optimizer_color(name: str, index: int = 0) -> str:
    """The fixed colour of optimizer ``name``; other series get the ``index``-th spare colour."""
    key = optimizer_key(name)
    if key in OPTIMIZER_COLORS:
        return OPTIMIZER_COLORS[key]
    return _EXTRA_COLORS[index % len(_EXTRA_COLORS)]


def optimizer_marker(name: str, index: int = 0) -> str:
    """The fixed marker of optimizer ``name`` (for greyscale print); others by ``index``."""
    return _OPTIMIZER_MARKERS.get(optimizer_key(name), _EXTRA_MARKERS[index % len(_EXTRA_MARKERS)])


def optimizer_label(name: str) -> str:
    """Display name: a plain optimizer name in its paper spelling (``"zsharp"`` -> ``"ZSharp"``);
    anything longer (``"ZSharp (p=0.9)"``) unchanged."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return _OPTIMIZER_LABELS.get(_ALIASES.get(key, key), str(name))


def short_label(label: str, max_chars: int = 28) -> str:
    """``label`` when it has at most ``max_chars`` characters, else its end after an ellipsis: run
    names that are whole paths would squeeze a figure's panels to nothing."""
    label = str(label)
    return label if len(label) <= max_chars else "\u2026" + label[-(max_chars - 1):]


def legend_columns(labels: Sequence[str], width: float, max_columns: int = 4) -> int:
    """The most legend columns (at most ``max_columns``) whose entries fit across ``width`` inches.

    Matplotlib fills a legend column by column; each column is as wide as its longest label (taken
    as 0.5 em per character, measured on the serif font) plus the handle and the spacing (3.5 em),
    and the frame's padding adds 1 em.
    """
    size = mpl.font_manager.FontProperties(size=mpl.rcParams["legend.fontsize"]).get_size_in_points()
    lengths = [len(str(label)) for label in labels] or [1]
    for ncols in range(min(max_columns, len(lengths)), 1, -1):
        rows = -(-len(lengths) // ncols)
        columns = [lengths[i:i + rows] for i in range(0, len(lengths), rows)]
        if (1.0 + sum(0.5 * max(c) + 3.5 for c in columns)) * size / 72.0 <= width:
            return ncols
    return 1


def series_colors(names: Iterable[str]) -> dict[str, str]:
    """Colours for a list of series: known optimizers keep theirs, others share the spare colours
    without repeating a colour already taken in this list while one is free."""
    names = list(dict.fromkeys(str(n) for n in names))
    taken = {OPTIMIZER_COLORS[optimizer_key(n)] for n in names if optimizer_key(n) in OPTIMIZER_COLORS}
    spare = [c for c in _EXTRA_COLORS if c not in taken] or _EXTRA_COLORS
    out, i = {}, 0
    for n in names:
        if optimizer_key(n) in OPTIMIZER_COLORS:
            out[n] = OPTIMIZER_COLORS[optimizer_key(n)]
        else:
            out[n] = spare[i % len(spare)]
            i += 1
    return out


def _rc(venue: str, column: str) -> dict[str, Any]:
    spec = VENUES[venue]
    width = spec[column]
    base = spec["font"]
    return {
        "figure.figsize": (width, width * _GOLDEN),
        "figure.dpi": 100,
        "figure.constrained_layout.use": True,
        "figure.constrained_layout.h_pad": 0.02,
        "figure.constrained_layout.w_pad": 0.02,
        "savefig.dpi": 300,
        "savefig.bbox": None,
        "savefig.pad_inches": 0.02,
        "font.family": "serif",
        "font.serif": ["Times New Roman", "Times", "Nimbus Roman", "TeX Gyre Termes", "STIXGeneral",
                       "DejaVu Serif"],
        "mathtext.fontset": "stix",
        "font.size": base,
        "axes.titlesize": base + 1,
        "axes.labelsize": base,
        "xtick.labelsize": base - 1,
        "ytick.labelsize": base - 1,
        "legend.fontsize": base - 1,
        "legend.title_fontsize": base - 1,
        "legend.frameon": False,
        "legend.handlelength": 1.8,
        "axes.linewidth": 0.6,
        "axes.grid": True,
        "axes.axisbelow": True,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.prop_cycle": mpl.cycler(color=_EXTRA_COLORS),
        "grid.color": "#DDDDDD",
        "grid.linewidth": 0.4,
        "grid.alpha": 1.0,
        "lines.linewidth": 1.2,
        "lines.markersize": 3.5,
        "xtick.major.width": 0.6,
        "ytick.major.width": 0.6,
        "xtick.major.size": 2.5,
        "ytick.major.size": 2.5,
        "xtick.minor.size": 1.5,
        "ytick.minor.size": 1.5,
        "pdf.fonttype": 42,  # embed TrueType: venues reject Type 3 fonts
        "ps.fonttype": 42,
        "image.cmap": "viridis",
    }


@contextlib.contextmanager
def style(venue: str = "neurips", column: str = "single") -> Iterator[dict[str, Any]]:
    """Context manager: figure size, fonts and palette for ``venue`` at ``column`` width.

    ``venue`` is one of ``"neurips"``, ``"icml"``, ``"iclr"``, ``"paper"``; ``column`` is
    ``"single"`` (one column) or ``"double"`` (across both columns of a two-column venue).
    Yields the rcParams it set; restores every rcParam on exit.

    >>> with style("icml", "single"):
    ...     ax = plot_density(result)            # one ICML column wide, 7.5 pt text
    ...     save_figure(ax.figure, "figures/density")
    """
    venue_key = str(venue).lower()
    if venue_key not in VENUES:
        raise UserInputError(f"unknown style venue {venue!r}; choose one of {', '.join(sorted(VENUES))}")
    if column not in ("single", "double"):
        raise UserInputError(f"unknown column {column!r}; choose 'single' or 'double'")
    params = _rc(venue_key, column)
    with mpl.rc_context(params):
        try:
            yield params
        finally:
            # Jupyter's inline backend turns interactive mode on at the first draw; rc_context would
            # switch it back off on exit and stop later figures from showing, so keep its value.
            interactive = mpl.rcParams["interactive"]
    mpl.rcParams["interactive"] = interactive


def figure_width() -> float:
    """The width (inches) figures are created with: the current ``figure.figsize`` width."""
    return float(mpl.rcParams["figure.figsize"][0])


def new_figure(aspect: float = _GOLDEN, *, nrows: int = 1, ncols: int = 1, width: float | None = None,
               subplot_kw: dict[str, Any] | None = None, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure ``width`` wide (default: the current style's width) and ``aspect * width`` high.

    Made with pyplot so it shows inline in notebooks like any figure; close it with
    ``plt.close(fig)`` when drawing many in a loop.
    """
    if width is None:
        width = figure_width()
    kwargs.setdefault("squeeze", True)
    # a height in whole 1/50 in gives whole pixels at 100, 150, 300 and 600 dpi
    height = max(round(width * aspect * 50) / 50, 0.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained",
                             subplot_kw=subplot_kw, **kwargs)
    return fig, axes


def figure_axes(fig: Figure | None, aspect: float = _GOLDEN, *, nrows: int = 1, ncols: int = 1,
                width: float | None = None, **kwargs: Any) -> tuple[Figure, np.ndarray]:
    """``nrows`` x ``ncols`` panels on ``fig``, or on a :func:`new_figure` of ``aspect`` and ``width``
    when ``fig`` is None; the Axes always come as an array."""
    if fig is None:
        fig, axes = new_figure(aspect, nrows=nrows, ncols=ncols, width=width, **kwargs)
    else:
        axes = fig.subplots(nrows, ncols, **kwargs)
    return fig, np.atleast_1d(axes)


_FORMATS = ("pdf", "png", "svg", "eps")


def save_figure(fig: Figure, stem: str | os.PathLike[str], formats: Sequence[str] = ("pdf", "png"),
                dpi: int | None = None) -> list[Path]:
    """Save ``fig`` as ``stem.pdf``, ``stem.png``, ... atomically; return the paths written.

    The page size is exactly the figure size (no tight cropping), so a figure made inside
    :func:`style` keeps its column width; raster formats use ``dpi`` (default 300, print quality).
    Vector formats embed TrueType fonts. File metadata carries no date, so reruns give the same files.
    """
    if isinstance(formats, str):
        formats = (formats,)
    formats = [str(f).lower().lstrip(".") for f in formats]
    bad = [f for f in formats if f not in _FORMATS]
    if bad or not formats:
        raise UserInputError(f"formats must be a non-empty subset of {_FORMATS}, got {tuple(formats)}")
    if dpi is None:
        dpi = 300
    if dpi < 72:
        raise UserInputError(f"dpi must be >= 72 for a legible figure, got {dpi}")
    stem = Path(stem)
    if stem.suffix.lower().lstrip(".") in _FORMATS:
        stem = stem.with_suffix("")
    metadata = {"pdf": {"CreationDate": None, "Producer": None}, "png": {"Software": None},
                "svg": {"Date": None}, "eps": None}
    written = []
    with mpl.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "sharpscope"}):
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            with atomic_output(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, metadata=metadata[fmt])
            written.append(path)
    return written
