"""Benchmarks: `make bench` (bench.run_cpu, CPU figures) and `make bench-gpu` (bench.run_gpu, a CUDA machine).

bench_decode and bench_model are the per-stage micro-benchmarks; plain_loop is the single-process
reference the Ray job is compared with.
"""
