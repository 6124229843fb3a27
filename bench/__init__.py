"""Benchmark suite for the hot paths: training step, episode pipeline, evaluation, pseudolabels.

    python -m bench --quick                      # < 3 min on 2 CPU cores; writes bench/results.json
    python -m bench --device cuda --out bench/results_h100.json

Each measurement runs in its own process (forked from a server that has imported torch once), so its peak memory
(``resource.getrusage`` max RSS; ``torch.cuda.max_memory_allocated`` on CUDA) is its own. Timings use
``time.perf_counter`` around synchronised work (``torch.cuda.synchronize`` on CUDA). Modules:

* :mod:`bench.measure`: process isolation, repeated timing, machine description;
* :mod:`bench.suite`: the measurements and :func:`bench.suite.run_suite`;
* :mod:`bench.report`: the Markdown table.
"""
