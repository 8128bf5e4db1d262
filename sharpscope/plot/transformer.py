r"""Which layers of a transformer ZSharp's filter selects: a block x kind heatmap.

A 12-block ViT has about 50 filtered tensors (``ndim > 1``) and 200 parameter tensors in all; one bar or
row per tensor does not read. :func:`plot_layer_selection` groups the tensors with
:func:`sharpscope.analysis.layer_groups.layer_groups` -- by block (rows) and by part (columns: attention
``q, k, v`` or fused ``qkv``, attention output, MLP input and output) or coarser by kind (attention / MLP)
-- and colours each cell by a mask statistic averaged over the tensors in it:

* ``kept_fraction``: the share of a tensor's entries the mask keeps, :math:`|m_t| / n_t` (%);
* ``energy_kept``: the share of the gradient's squared norm in the kept entries,
  :math:`\|g_t \odot m_t\|^2 / \|g_t\|^2` (%; from :func:`~sharpscope.mask_statistics`);
* ``perturbation_share``: the cell's share of the squared perturbation norm,
  :math:`\sum_{t \in \text{cell}} \|e_t\|^2 / \sum_t \|e_t\|^2` (%; summed over the cell), and
  ``grad_share``, the same for the gradient (which is SAM's perturbation share);
* any other numeric column of the mask statistics (``threshold`` :math:`\tau` in :math:`|z|` units,
  ``grad_norm``, ``mask_jaccard``, ...).

Tensors outside the blocks (patch/token embedding, class token, position embedding before the blocks;
the head after them) get a strip of their own above and below. Biases and normalisation parameters are
never filtered (``ndim`` 1), so they never appear.
"""

from __future__ import annotations

from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..errors import UserInputError
from ._data import choose, require_columns, require_finite
from .style import figure_width, new_figure
from .zsharp import _mask_table

__all__ = ["plot_layer_selection", "layer_selection_table"]

#: Short column titles of the parts and kinds.
PART_LABELS = {
    "token": "token", "patch": "patch", "segment": "segment", "cls": "cls token", "position": "position",
    "q": "attn q", "k": "attn k", "v": "attn v", "qkv": "attn qkv", "attn_out": "attn out", "attention": "attn",
    "mlp_in": "MLP in", "mlp_out": "MLP out", "mlp": "MLP", "head": "head", "pooler": "pooler", "conv": "conv",
    "embedding": "embedding", "other": "other", "norm": "norm", "bias": "bias",
}
_VALUE_LABELS = {
    "kept_fraction": "Entries kept (%)",
    "energy_kept": r"Gradient energy kept, $\|g\odot m\|^2/\|g\|^2$ (%)",
    "perturbation_share": r"Share of $\|e\|^2$ (%)",
    "grad_share": r"Share of $\|g\|^2$ (%)",
    "threshold": r"Threshold $\tau$ ($|z|$)",
    "grad_norm": r"Gradient norm $\|g_t\|$",
    "perturbation_norm": r"Perturbation norm $\|e_t\|$",
    "mask_jaccard": "Mask overlap between batches (Jaccard)",
    "fallback_rate": "Fallback-to-SAM rate",
}
_PERCENT = ("kept_fraction", "energy_kept", "perturbation_share", "grad_share")
_SHARES = ("perturbation_share", "grad_share")
_INPUT_KINDS = ("embedding", "position", "conv")


def _value_column(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """``df`` with a ``_value`` column: ``value`` itself, or a share of squared norms per step."""
    if value in df.columns:
        return df.assign(_value=df[value].astype(float))
    source = {"perturbation_share": ("perturbation_share_tensor", "perturbation_norm"),
              "grad_share": (None, "grad_norm")}.get(value)
    if source is not None and source[0] in df.columns:
        return df.assign(_value=df[source[0]].astype(float))
    if source is not None and source[1] in df.columns:
        sq = df[source[1]].astype(float) ** 2
        keys = [k for k in ("optimizer", "step") if k in df.columns]
        return df.assign(_value=sq / (sq.groupby([df[k] for k in keys]).transform("sum") if keys else sq.sum()))
    require_columns(df, [value], "data")
    raise AssertionError("unreachable")  # pragma: no cover


def layer_selection_table(data: Any, value: str = "kept_fraction", *, by: str = "part",
                          agg: str | None = None) -> pd.DataFrame:
    """The numbers :func:`plot_layer_selection` draws: one row per (stack, block, column) cell.

    ``data``: mask statistics (a :func:`~sharpscope.mask_statistics` result or its table, per layer or per
    batch), the ``masks.csv`` training log (path, run folder or DataFrame), ``ZSharp.mask_stats`` or the
    optimizer. Each tensor's ``value`` is first averaged over steps (or batches); then ``agg`` (``"mean"``,
    default, or ``"sum"``, the default for ``*_share`` values) combines the tensors of a cell. Shares and
    fractions are in percent. Columns: ``stack, block`` (``<NA>`` outside the blocks), ``position``
    (``"input"``, ``"block"`` or ``"output"``), ``column`` (the part or kind), ``value``, ``n_tensors`` and
    ``layers`` (the tensor names, ``;``-separated).
    """
    from ..analysis.layer_groups import layer_groups

    choose(by, ("part", "kind"), "by")
    agg = agg if agg is not None else ("sum" if value in _SHARES else "mean")
    choose(agg, ("mean", "sum"), "agg")
    df = _mask_table(data)
    if "optimizer" in df.columns and df["optimizer"].nunique() > 1:
        raise UserInputError("plot_layer_selection draws one run at a time; pass one run's mask statistics "
                             f"(got {df['optimizer'].nunique()}: {sorted(df['optimizer'].unique())})")
    df = _value_column(df, value)
    per_layer = df.groupby("layer", sort=False)["_value"].mean()
    require_finite(per_layer.to_numpy(), f"data[{value!r}] averaged per layer")
    groups = layer_groups(list(per_layer.index)).set_index("layer")
    groups["value"] = per_layer * (100.0 if value in _PERCENT else 1.0)
    groups["position"] = np.where(groups["block"].notna(), "block",
                                  np.where(groups["kind"].isin(_INPUT_KINDS), "input", "output"))
    groups["column"] = groups[by]
    cells = groups.reset_index().groupby(["position", "stack", "block", "column"], sort=False, dropna=False)
    table = cells.agg(value=("value", agg), n_tensors=("value", "size"), layers=("layer", ";".join)).reset_index()
    table["_c"] = table["column"].map(_column_order(by))
    table["_p"] = table["position"].map({"input": 0, "block": 1, "output": 2})
    stacks = {s: i for i, s in enumerate(dict.fromkeys(groups["stack"]))}
    table["_s"] = table["stack"].map(stacks)
    table = table.sort_values(["_p", "_s", "block", "_c"], kind="stable", na_position="first")
    return table.drop(columns=["_c", "_p", "_s"]).reset_index(drop=True)[
        ["stack", "block", "position", "column", "value", "n_tensors", "layers"]]


def _column_order(by: str) -> dict[str, int]:
    """Display position of each part (embedding, attention, MLP, head) or kind (the order of ``KINDS``)."""
    from ..analysis.layer_groups import KINDS, PARTS

    return {c: i for i, c in enumerate(PARTS if by == "part" else KINDS)}


def _row_labels(cells: pd.DataFrame) -> list[tuple[str, int]]:
    """The block rows in order, as (stack, block) pairs."""
    return list(dict.fromkeys(zip(cells["stack"], cells["block"].astype(int))))


def _stack_names(stacks: list[str]) -> dict[str, str]:
    """Short names telling the stacks apart: what differs after dropping the common dotted prefix/suffix."""
    if len(stacks) < 2:
        return {s: "" for s in stacks}
    parts = [s.split(".") for s in stacks]
    head = 0
    while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    return {s: ".".join(p[head:len(p) - tail]) for s, p in zip(stacks, parts)}


def _grid(cells: pd.DataFrame, rows: list[Any], key: Any) -> tuple[np.ndarray, list[str]]:
    """The (rows x columns) matrix of ``cells`` (NaN where a row lacks a column) and its column names."""
    columns = list(dict.fromkeys(cells.sort_values("_order", kind="stable")["column"]))
    grid = np.full((len(rows), len(columns)), np.nan)
    for _, cell in cells.iterrows():
        grid[rows.index(key(cell)), columns.index(cell["column"])] = cell["value"]
    return grid, columns


def _annotate(ax: Axes, grid: np.ndarray, norm: Normalize, cmap: Any, percent: bool) -> None:
    """Each cell's value, in black or white to read on its colour."""
    for (i, j), v in np.ndenumerate(grid):
        if not np.isfinite(v):
            continue
        r, g, b, _ = cmap(norm(v))
        text = f"{v:.0f}" if percent and abs(v) >= 9.95 else (f"{v:.1f}" if percent else f"{v:.3g}")
        text = "<0.1" if percent and 0 < abs(v) < 0.05 else text
        ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize="x-small",
                color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")


def _draw(ax: Axes, grid: np.ndarray, columns: list[str], ylabels: list[str], norm: Normalize, cmap: Any,
          annotate: bool, percent: bool, top: bool, kwargs: dict[str, Any]) -> Any:
    mesh = ax.pcolormesh(np.ma.masked_invalid(grid), **{"cmap": cmap, "norm": norm, "edgecolors": "white",
                                                          "linewidth": 0.5, **kwargs})
    ax.set_facecolor("0.92")  # a block without that part
    ax.set_xticks(np.arange(len(columns)) + 0.5, [PART_LABELS.get(c, c) for c in columns])
    ax.set_yticks(np.arange(len(ylabels)) + 0.5, ylabels)
    ax.set_xlim(0, len(columns))
    ax.set_ylim(len(ylabels), 0)
    ax.tick_params(length=0)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if top:
        ax.xaxis.tick_top()
    if annotate:
        _annotate(ax, grid, norm, cmap, percent)
    return mesh


def _norm(values: np.ndarray) -> Normalize:
    """One colour scale for every panel; a constant value gets a scale around it, not a stretched one."""
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-6 * max(abs(high), 1e-12):
        pad = abs(high) * 0.5 if high != 0 else 1.0
        return Normalize(low - pad, high + pad)
    return Normalize(low, high)


def _user_norm(kwargs: dict[str, Any]) -> Normalize | None:
    """A colour scale given as ``norm=`` (e.g. ``LogNorm()``) or ``vmin=``/``vmax=``, taken out of ``kwargs``."""
    norm, vmin, vmax = kwargs.pop("norm", None), kwargs.pop("vmin", None), kwargs.pop("vmax", None)
    if norm is not None and (vmin is not None or vmax is not None):
        raise UserInputError("give the colour scale as norm= or as vmin=/vmax=, not both")
    return norm if norm is not None else (Normalize(vmin, vmax) if vmin is not None or vmax is not None else None)


def plot_layer_selection(data: Any, value: str = "kept_fraction", *, by: str = "part", agg: str | None = None,
                         annotate: bool = True, cmap: str = "cividis", fig: Figure | None = None,
                         **kwargs: Any) -> Figure:
    """A block x part heatmap of ZSharp's mask statistics on a transformer, one colour scale, values written in.

    ``data``: mask statistics of one run (a :func:`~sharpscope.mask_statistics` result, the ``masks.csv``
    log or its run folder, ``ZSharp.mask_stats``, or such a table); see :func:`layer_selection_table`,
    which returns the numbers drawn. ``value``: the statistic (``kept_fraction``, ``energy_kept``,
    ``perturbation_share``, ``grad_share``, ``threshold``, or any numeric column). ``by``: ``"part"``
    (columns ``attn q/k/v/qkv/out``, ``MLP in/out``) or ``"kind"`` (attention / MLP). ``agg``: how a cell
    combines its tensors (``"mean"``; ``"sum"`` for shares). Rows are the blocks (``Block 0`` at the top;
    ``encoder 0 ... decoder 0 ...`` for several stacks); tensors outside the blocks get a strip above
    (embeddings) and below (head). Grey cells: that block has no such tensor. ``kwargs`` go to
    ``ax.pcolormesh``. Returns the figure; ``fig.axes`` are the input strip (if any), the block panel, the
    output strip (if any) and the colour bar.
    """
    table = layer_selection_table(data, value, by=by, agg=agg)
    table["_order"] = table["column"].map(_column_order(by))
    blocks = table[table["position"] == "block"]
    if blocks.empty:
        raise UserInputError("none of the layers is inside a numbered transformer block (blocks.<i>, layers.<i>, "
                             "h.<i>, ...); for other models use plot_mask_summary")
    rows = _row_labels(blocks)
    names = _stack_names(list(dict.fromkeys(s for s, _ in rows)))
    main, columns = _grid(blocks, rows, lambda c: (c["stack"], int(c["block"])))
    strips = {p: _grid(table[table["position"] == p], [p], lambda c: c["position"])
              for p in ("input", "output") if (table["position"] == p).any()}
    norm, cmap = _user_norm(kwargs) or _norm(table["value"].to_numpy(float)), mpl.colormaps[cmap]
    norm.autoscale_None(table["value"].to_numpy(float))  # one scale for all panels, not the first one's
    percent = value in _PERCENT
    n_cols = max([len(columns), *(len(c) for _, c in strips.values())])
    heights = [1.0] * ("input" in strips) + [len(rows)] + [1.0] * ("output" in strips)
    width = figure_width()
    if fig is None:
        fig, _ = new_figure((0.9 + 0.2 * sum(heights)) / width, width=width)
        fig.clear()
    spec = fig.add_gridspec(len(heights), n_cols, height_ratios=heights)
    axes, meshes, r = [], [], 0
    for position in ("input", "block", "output"):
        if position != "block" and position not in strips:
            continue
        grid, cols = strips[position] if position != "block" else (main, columns)
        ax = fig.add_subplot(spec[r, :len(cols)])
        labels = [position] if position != "block" else [f"{names[s]} {b}".strip() for s, b in rows]
        meshes.append(_draw(ax, grid, cols, labels, norm, cmap, annotate, percent, position == "input", kwargs))
        axes.append(ax)
        r += 1
    block_ax = axes[1] if "input" in strips else axes[0]
    block_ax.set_ylabel("Block")
    label = _VALUE_LABELS.get(value, value.replace("_", " "))
    agg_used = agg if agg is not None else ("sum" if value in _SHARES else "mean")
    cb = fig.colorbar(meshes[0], ax=axes, pad=0.02, aspect=30, fraction=0.05)
    cb.set_label(f"{label}\n({agg_used} over the tensors of a cell)")
    cb.outline.set_linewidth(0.5)
    return fig
