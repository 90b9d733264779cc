"""The benchmark harness: data, models, runner, report."""
