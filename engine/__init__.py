"""The training engine around ``training.py``'s loop (the MAE split: setup in the script, the step machinery here).

``step_guard`` skips non-finite steps without a host sync, ``preemption`` snapshots on SIGTERM/SIGUSR1,
``lr_schedule`` builds the learning-rate schedules, ``val_monitor`` scores ``val_scans`` at each snapshot, and
``tensorboard_log`` writes the optional TensorBoard events.
"""
