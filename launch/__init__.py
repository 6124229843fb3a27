"""Launching many training + test runs: the run plan and one run's commands (:mod:`launch.runs`), a local device
queue (:mod:`launch.local`) and SLURM job arrays through submitit (:mod:`launch.slurm`). The command line is
``python -m launch.sweep`` (docs/sweep.md)."""
