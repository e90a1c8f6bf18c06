"""What is logged or evaluated while training."""

from callbacks.data_stats import DataStatsMonitor

__all__ = ["DataStatsMonitor"]
