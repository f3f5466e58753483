"""Allure reports for a run: the results folder's metadata, and an HTML report that works offline."""

from hil.report.environment import HOST_INCOMPATIBILITY_PHRASE, write_categories, write_environment
from hil.report.render import render_report

__all__ = ["HOST_INCOMPATIBILITY_PHRASE", "render_report", "write_categories", "write_environment"]
