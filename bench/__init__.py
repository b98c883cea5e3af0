"""Benchmarks of the k5 engine: `python -m bench --help` (run.py), FLOP counts (flops.py), the multi-GPU projection
(projection.py), plots (plot.py) and the one-call GPU script (gpu.sh). Results live in bench/results/."""
