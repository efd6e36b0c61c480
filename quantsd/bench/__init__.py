"""Benchmarks: ``quantsd bench`` (speed, memory, max resolution under a VRAM cap).  ``core.py`` builds
and measures (CUDA), ``configs.py`` says what each row is, ``stats.py`` holds the pure logic (the
max-res bisection, the eager pair's ratios and intervals), ``report.py`` writes report.md and the plot."""

from .core import (Bench, BenchConfig, binary_search_max, default_configs, markdown_report, optional_configs,
                   plot_time_vs_pixels, sdpa_report, summary_rows, to_packed, weight_bytes, write_reports)

__all__ = ["Bench", "BenchConfig", "binary_search_max", "default_configs", "markdown_report", "optional_configs",
           "plot_time_vs_pixels", "sdpa_report", "summary_rows", "to_packed", "weight_bytes", "write_reports"]
