"""Publication figures: one function per figure, results (or tidy DataFrames) in, Axes/Figure out.

Every function takes what it draws as its first argument, ``data`` (a result, its tidy DataFrame,
or a mapping ``{label: either}``; the names used before, such as ``landscape=`` or ``table=``, still
work and warn), passes further keyword arguments on to the matplotlib call that draws the data (as
seaborn does: ``plot_landscape_1d(res, linewidth=2)``), and takes ``ax=None`` (single panel; a figure
sized to the current style is created when absent) or ``fig=None`` (multi-panel) and returns the
Axes or Figure. Nothing is shown and no global setting changes; sizes, fonts and the palette come
from ``with style(venue, column):``. Every figure of ``sharpscope figures`` / ``sharpscope demo`` is
one call here (see :mod:`sharpscope.commands.figures` for which).

>>> from sharpscope.plot import style, plot_density, save_figure
>>> with style("neurips"):
...     ax = plot_density({"sgd": dens_sgd, "zsharp": dens_zsharp}, eigenvalues={"sgd": eig_sgd, "zsharp": eig_z})
...     save_figure(ax.figure, "figures/density")      # figures/density.pdf + .png (300 dpi)
"""

from .landscape import (
    interpolation_endpoints,
    plot_contour,
    plot_contours,
    plot_interpolation,
    plot_interpolations,
    plot_landscape_1d,
    plot_landscape_1d_panels,
    plot_surface,
    plot_surfaces,
    surface_limits,
)
from .spectrum import (
    plot_curvature_trajectories,
    plot_curvature_trajectory,
    plot_density,
    plot_layer_curvature,
    plot_sharpness_summary,
)
from .style import (
    OPTIMIZER_COLORS,
    VENUES,
    new_figure,
    optimizer_color,
    optimizer_label,
    optimizer_marker,
    optimizer_rank,
    save_figure,
    style,
)
from .sweep import (
    aggregate_seeds,
    plot_cost,
    plot_mask_stability,
    plot_seed_summary,
    plot_sharpness_vs_gap,
    plot_sweep,
    rank_correlations,
)
from .tracking import plot_sharpness_over_training, tracked_masks, tracked_rows
from .training import plot_training_curve, plot_training_curves, read_history
from .transformer import layer_selection_table, plot_layer_selection
from .zsharp import (
    plot_alignment,
    plot_alignment_summary,
    plot_mask_heatmap,
    plot_mask_summary,
    plot_zscore_distributions,
    read_mask_log,
    rule_kept_fraction,
)

__all__ = [
    "OPTIMIZER_COLORS",
    "VENUES",
    "aggregate_seeds",
    "plot_cost",
    "plot_mask_stability",
    "plot_seed_summary",
    "plot_sharpness_vs_gap",
    "plot_sweep",
    "rank_correlations",
    "interpolation_endpoints",
    "new_figure",
    "optimizer_color",
    "optimizer_label",
    "optimizer_marker",
    "optimizer_rank",
    "plot_alignment",
    "plot_alignment_summary",
    "plot_contour",
    "plot_contours",
    "plot_curvature_trajectories",
    "plot_curvature_trajectory",
    "plot_density",
    "plot_interpolation",
    "plot_interpolations",
    "plot_landscape_1d",
    "plot_landscape_1d_panels",
    "plot_layer_curvature",
    "plot_layer_selection",
    "layer_selection_table",
    "plot_mask_heatmap",
    "plot_mask_summary",
    "plot_sharpness_over_training",
    "plot_sharpness_summary",
    "plot_surface",
    "plot_surfaces",
    "plot_training_curve",
    "plot_training_curves",
    "plot_zscore_distributions",
    "read_history",
    "read_mask_log",
    "rule_kept_fraction",
    "save_figure",
    "style",
    "surface_limits",
    "tracked_masks",
    "tracked_rows",
]
