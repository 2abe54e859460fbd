"""Plots and the Markdown / HTML report, built only from saved run artifacts."""
