"""Benchmarks: ``quantsd bench`` (speed, memory, max resolution under a VRAM cap).  See core.py."""

from .core import (Bench, BenchConfig, binary_search_max, default_configs, markdown_report, optional_configs,
                   plot_time_vs_pixels, sdpa_report, summary_rows, to_packed, weight_bytes, write_reports)

__all__ = ["Bench", "BenchConfig", "binary_search_max", "default_configs", "markdown_report", "optional_configs",
           "plot_time_vs_pixels", "sdpa_report", "summary_rows", "to_packed", "weight_bytes", "write_reports"]
