"""fattn benchmarks: pytest-benchmark suites per package, a report CLI and the GPU run script."""
