"""Helpers of the report tests: a phantom run with a report, and a headless Chromium driver."""
