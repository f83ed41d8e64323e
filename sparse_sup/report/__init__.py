"""Pictures and a markdown report of a run, from its run directory alone (``sparse-sup plot``)."""

from .data import RunData, load_run
from .plots import make_plots
from .report import write_report, write_run_report

__all__ = ["RunData", "load_run", "make_plots", "write_report", "write_run_report"]
