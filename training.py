"""Self-supervised training of ALPNet on superpixel episodes (docs/method.md#episodes to
docs/method.md#training-schedule).

    python training.py with CHAOST2 setting2 label_sets=0 eval_fold=0
    python training.py with demo run_dir=runs/demo            # CPU, a few minutes, on the phantom
    torchrun --nproc_per_node=4 training.py with SABS          # several GPUs (DDP)

The loop runs exactly ``n_steps`` optimiser steps. Episode i of the run is drawn from the generator (seed, i), so
the data order does not depend on the worker count and a resumed run (``resume=True``, or
``resume_from=<run folder | checkpoint>``) sees the episodes it would have seen. Checkpoints (atomic) hold model,
optimizer, scheduler, step, config, RNG states, loss history and the normaliser (docs/troubleshooting.md).
"""

from __future__ import annotations

import sys
from typing import Any

from config_ssl_upload import ex
from engine.train_loop import run_training
from util.cli import run_cli


@ex.main
def train(_run: Any, _config: dict, _log: Any) -> dict:
    """Train ALPNet with the resolved config (:func:`engine.train_loop.run_training`)."""
    return run_training(_run, _config, _log)


if __name__ == "__main__":
    sys.exit(run_cli(ex, sys.argv))
