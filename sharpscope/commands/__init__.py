"""The orchestration behind ``sharpscope analyze``, ``sharpscope figures`` and ``sharpscope demo``.

Each sub-command is a thin argparse layer (``add_arguments(parser)``, ``run(args) -> int``) over a
function that is just as usable from Python or a notebook:

* :func:`analyze_checkpoint` -- checkpoint + data -> one self-describing result file per analysis,
  named ``<run>__<analysis>.nc`` (one function per analysis in :data:`ANALYSIS_STEPS`; the
  checkpoint is first checked against the data by :func:`check_ready`);
* :func:`draw_figures` -- a folder of result files -> every comparison figure they allow;
* :func:`run_demo` -- train SGD, SAM and ZSharp on the bundled digits, analyse, draw, summarise;
* :func:`summary_table` -- the per-run numbers (accuracy, lambda_max, trace, sharpness) of a folder.
"""

from .analyze import ANALYSES, ANALYSIS_STEPS, AnalysisOptions, analyze_checkpoint, check_ready, resume_path
from .demo import run_demo
from .figures import draw_figures
from .summary import markdown_table, summary_table

__all__ = ["ANALYSES", "ANALYSIS_STEPS", "AnalysisOptions", "analyze_checkpoint", "check_ready", "draw_figures",
           "markdown_table", "resume_path", "run_demo", "summary_table"]
