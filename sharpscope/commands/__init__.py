"""The orchestration behind ``sharpscope analyze``, ``sharpscope figures`` and ``sharpscope demo``.

Each sub-command is a thin argparse layer (``add_arguments(parser)``, ``run(args) -> int``) over a
function that is just as usable from Python or a notebook:

* :func:`analyze_checkpoint` -- checkpoint + data -> one self-describing result file per analysis,
  named ``<run>__<analysis>.nc``;
* :func:`draw_figures` -- a folder of result files -> every comparison figure they allow;
* :func:`run_demo` -- train SGD, SAM and ZSharp on the bundled digits, analyse, draw, summarise;
* :func:`summary_table` -- the per-run numbers (accuracy, lambda_max, trace, sharpness) of a folder.
"""

from .analyze import ANALYSES, AnalysisOptions, analyze_checkpoint
from .demo import run_demo
from .figures import draw_figures
from .summary import markdown_table, summary_table

__all__ = ["ANALYSES", "AnalysisOptions", "analyze_checkpoint", "draw_figures", "markdown_table", "run_demo",
           "summary_table"]
