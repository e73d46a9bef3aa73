"""Render: what people read. The tabulate report and diffs (``report``)."""
from .report import RenderedDiff, render_diff, rendered, report

__all__ = ["report", "render_diff", "rendered", "RenderedDiff"]
