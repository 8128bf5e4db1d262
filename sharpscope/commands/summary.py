"""The per-run summary of a results folder: accuracy, lambda_max, trace, sharpness.

Read from the result files alone (``<run>__<analysis>.nc``), so ``sharpscope analyze``,
``sharpscope figures`` and ``sharpscope demo`` all print the same table.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import UserInputError
from ..train.config import SHARPNESS_AWARE

#: Columns of :func:`summary_table` and their display headers.
COLUMNS: dict[str, str] = {
    "run": "run",
    "optimizer": "optimizer",
    "rho": "rho",
    "percentile": "p",
    "epochs": "epochs",
    "seeds": "seeds",
    "test_acc": "test acc. (%)",
    "train_acc": "train acc. (%)",
    "gap": "gap (pp)",
    "lambda_max": "lambda_max",
    "trace": "trace",
    "trace_stderr": "trace s.e.",
    "sharpness_worst": "sharpness (worst)",
    "sharpness_average": "sharpness (avg.)",
    "sharpness_average_stderr": "sharpness (avg.) s.e.",
}


def result_files(results_dir: str | Path) -> list[Path]:
    """The ``.nc`` files under ``results_dir`` (recursively), sorted."""
    root = Path(results_dir)
    if not root.exists():
        raise UserInputError(f"results folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise UserInputError(f"{str(root)!r} is not a folder; give the folder written by sharpscope analyze")
    return sorted(p for p in root.rglob("*.nc") if p.is_file())


def summary_table(results_dir: str | Path, *, epochs: bool = False) -> pd.DataFrame:
    """One row per run found in ``results_dir``; a column is NaN where its analysis was not run.

    ``test_acc``/``train_acc`` are the last epoch's accuracies in percent and ``gap`` their difference
    (train - test, percentage points), ``rho``/``percentile`` the optimizer's (NaN where it has none),
    ``trace_stderr`` the Hutch++ standard error, ``sharpness_*`` the loss increases at the radius
    stored in the files. The epoch checkpoints of a run (``epoch_XXXX.pt``, points of its trajectory,
    not runs) are left out unless ``epochs``.
    """
    from ..analysis.hessian import EigenResult, TraceResult
    from ..analysis.results import read_table
    from ..analysis.sharpness import SharpnessResult
    from .analyze import HISTORY_KIND, split_result_name

    rows: dict[str, dict[str, Any]] = {}
    for path in result_files(results_dir):
        run, analysis = split_result_name(path)
        if analysis == "interpolation":  # between two runs: a figure, not a row
            continue
        row = rows.setdefault(run, {"run": run})
        try:
            if analysis == "history":
                history, meta = read_table(path, HISTORY_KIND)
                _history_row(row, history, meta)
            elif analysis == "eigenvalues":
                row["lambda_max"] = float(EigenResult.load(path).eigenvalues[0])
            elif analysis == "trace":
                trace = TraceResult.load(path)
                row["trace"], row["trace_stderr"] = trace.estimate, trace.stderr
            elif analysis == "sharpness_worst":
                row["sharpness_worst"] = SharpnessResult.load(path).value
            elif analysis == "sharpness_average":
                result = SharpnessResult.load(path)
                row["sharpness_average"], row["sharpness_average_stderr"] = result.value, result.stderr
        except UserInputError:
            continue  # not the kind its name says: drawn (or refused) by kind elsewhere
    if not epochs:
        rows = {r: v for r, v in rows.items() if not _EPOCH_NAME.search(Path(v.get("_path") or r).stem)}
    names = display_names({r: v.get("_path") for r, v in rows.items()})
    for run, row in rows.items():
        row["run"] = names[run]
    table = pd.DataFrame(sorted(rows.values(), key=_run_order), columns=list(COLUMNS))
    if "train_acc" in table and "test_acc" in table:
        table["gap"] = table["train_acc"] - table["test_acc"]
    keep = [c for c in COLUMNS if c == "run" or table[c].notna().any()]
    return table[keep]


_EPOCH_NAME = re.compile(r"(^|_)epoch_\d+$")


def display_names(paths: dict[str, str | None]) -> dict[str, str]:
    """``{result name: shown name}``: a ``last.pt``/``best.pt`` shown by its run folder's name when
    those names are unique (``analyze`` falls back to whole paths, ``tmp_runs_sam_last``, when two
    checkpoints it was given share a name, e.g. the ``epoch_0005.pt`` of two runs)."""
    shown = {}
    for run, path in paths.items():
        p = Path(path) if path else None
        shown[run] = p.parent.name if p is not None and p.stem in ("last", "best") and p.parent.name else run
    if len(set(shown.values())) < len(shown):
        return {run: run for run in paths}
    return shown


def _history_row(row: dict[str, Any], history: pd.DataFrame, meta: dict[str, Any]) -> None:
    """Optimizer, hyperparameters, epochs and last accuracies of one run from its stored history."""
    config = meta.get("optimizer") or {}
    row["optimizer"] = config.get("name")
    row["_path"] = meta.get("checkpoint")
    for key in ("rho", "percentile"):
        if isinstance(config.get(key), (int, float)) and config.get("name") in _USES.get(key, ()):
            row[key] = float(config[key])
    row["epochs"] = int(history["epoch"].max()) if "epoch" in history else len(history)
    for column in ("test_acc", "train_acc"):
        if column in history and history[column].notna().any():
            row[column] = 100.0 * float(history[column].dropna().iloc[-1])


#: Which optimizers a hyperparameter means something for (SGD's config may carry a default rho).
_USES = {"rho": SHARPNESS_AWARE, "percentile": ("zsharp",)}

#: The measured columns averaged over seeds by :func:`seed_table`.
MEASURES = ("test_acc", "train_acc", "gap", "lambda_max", "trace", "sharpness_worst", "sharpness_average")


def seed_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (optimizer, rho, percentile) of :func:`summary_table`: ``seeds``
    (the number of runs), and for every measure its mean and ``<measure>_sd`` (sample s.d., ddof=1;
    NaN for one seed), over the runs that measured it."""
    from ..plot.sweep import aggregate_seeds

    config = [c for c in ("optimizer", "rho", "percentile") if c in table]
    if "optimizer" not in table:
        table = table.assign(optimizer=table["run"])
        config = ["optimizer", *config]
    agg = aggregate_seeds(table, config, [m for m in MEASURES if m in table])
    counts = table.groupby([table[c].astype(object).where(table[c].notna(), "-") for c in config],
                           sort=False, dropna=False).size().to_numpy()
    agg.insert(len(config), "seeds", counts)
    from ..plot.style import optimizer_rank

    agg = agg.assign(_rank=agg["optimizer"].map(lambda o: optimizer_rank(str(o))))
    agg = agg.sort_values(["_rank", *config], kind="stable").drop(columns="_rank").reset_index(drop=True)
    return agg.drop(columns=[c for c in agg if c.endswith("_n")])


def seed_markdown(table: pd.DataFrame) -> str:
    """:func:`seed_table` as markdown, each measure as ``mean ± s.d.`` (``mean`` alone for one seed)."""
    agg = seed_table(table)
    shown = agg[[c for c in agg if not c.endswith("_sd")]].copy().astype(object)
    for m in MEASURES:
        if m in agg:
            shown[m] = [_cell(v, m) if not isinstance(sd, float) or math.isnan(sd)
                        else f"{_cell(v, m)} ± {_cell(sd, m)}" for v, sd in zip(agg[m], agg[f"{m}_sd"])]
    headers = [COLUMNS.get(c, c) for c in shown.columns]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if c == "optimizer" else "---:" for c in shown.columns) + "|"]
    for _, row in shown.iterrows():
        lines.append("| " + " | ".join(str(v) if isinstance(v, str) else _cell(v, c) for c, v in row.items()) + " |")
    return "\n".join(lines) + "\n"


def _run_order(row: dict[str, Any]) -> tuple[int, str]:
    """Runs in :data:`~sharpscope.optim.OPTIMIZER_ORDER` (baselines first, ZSharp last), then by name."""
    from ..plot.style import optimizer_rank

    return (optimizer_rank(row.get("optimizer") or row["run"]), row["run"])


def _cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column in ("rho", "percentile") and isinstance(value, float):
        return f"{value:g}"
    if column in ("epochs", "seeds"):
        return str(int(value))
    if isinstance(value, float):
        if column in ("test_acc", "train_acc", "gap"):
            return f"{value:.1f}"
        return f"{value:#.3g}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; ``trace`` and ``sharpness (avg.)`` shown as ``value ± s.e.``."""
    table = table.copy()
    if "optimizer" in table and (table["optimizer"].astype(str) == table["run"].astype(str)).all():
        table = table.drop(columns="optimizer")  # runs named after their optimizer (the demo)
    for value, err in (("trace", "trace_stderr"), ("sharpness_average", "sharpness_average_stderr")):
        if value in table and err in table:
            table[value] = [f"{_cell(v, value)} ± {_cell(e, err)}" if isinstance(v, float) and not math.isnan(v)
                            else _cell(v, value) for v, e in zip(table[value], table[err])]
            table = table.drop(columns=err)
    headers = [COLUMNS.get(c, c) for c in table.columns]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if c in ("run", "optimizer") else "---:" for c in table.columns) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], c) for c in table.columns) + " |")
    return "\n".join(lines) + "\n"


def print_summary(results_dir: str | Path, file: Any = None) -> pd.DataFrame:
    """Print :func:`markdown_table` of :func:`summary_table` (to stdout) and return the table."""
    table = summary_table(results_dir)
    print(markdown_table(table), end="", file=file or sys.stdout)
    return table
