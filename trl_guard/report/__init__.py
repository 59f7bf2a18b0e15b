"""Plots and an HTML page from a run's logged metrics: `trl-guard report RUN_DIR [RUN_DIR ...]`."""

from .page import build_report
from .runs import ReportInputError, load_log_history

__all__ = ["ReportInputError", "build_report", "load_log_history"]
