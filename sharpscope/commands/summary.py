"""The per-run summary of a results folder: accuracy, lambda_max, trace, sharpness.

Read from the result files alone (``<run>__<analysis>.nc``), so ``sharpscope analyze``,
``sharpscope figures`` and ``sharpscope demo`` all print the same table.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import UserInputError

#: Columns of :func:`summary_table` and their display headers.
COLUMNS: dict[str, str] = {
    "run": "run",
    "optimizer": "optimizer",
    "epochs": "epochs",
    "test_acc": "test acc. (%)",
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


def summary_table(results_dir: str | Path) -> pd.DataFrame:
    """One row per run found in ``results_dir``; a column is NaN where its analysis was not run.

    ``test_acc`` is the last epoch's test accuracy in percent, ``trace_stderr`` the Hutch++ standard
    error, ``sharpness_*`` the loss increases at the radius stored in the files.
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
                row["optimizer"] = (meta.get("optimizer") or {}).get("name")
                row["epochs"] = int(history["epoch"].max()) if "epoch" in history else len(history)
                if "test_acc" in history and history["test_acc"].notna().any():
                    row["test_acc"] = 100.0 * float(history["test_acc"].dropna().iloc[-1])
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
    table = pd.DataFrame(sorted(rows.values(), key=_run_order), columns=list(COLUMNS))
    keep = [c for c in COLUMNS if c == "run" or table[c].notna().any()]
    return table[keep]


def _run_order(row: dict[str, Any]) -> tuple[int, str]:
    """Runs in :data:`~sharpscope.optim.OPTIMIZER_ORDER` (baselines first, ZSharp last), then by name."""
    from ..plot.style import optimizer_rank

    return (optimizer_rank(row.get("optimizer") or row["run"]), row["run"])


def _cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column == "epochs":
        return str(int(value))
    if isinstance(value, float):
        if column == "test_acc":
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
