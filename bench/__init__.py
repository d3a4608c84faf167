"""Benchmarks: ``make bench`` (short) and ``make bench-full``. See bench/README.md."""
