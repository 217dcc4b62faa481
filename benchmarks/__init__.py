"""tinygpt's benchmark suite: `python -m benchmarks` (see `benchmarks/run.py` and `benchmarks/README.md`).

Every figure is measured in one run against peers on the same weights, interleaved, as medians after
warm-up; the report prints ratios next to their targets. Nothing here is a test: a benchmark prints
numbers, it never asserts a time.
"""
