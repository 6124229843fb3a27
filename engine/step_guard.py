"""Skip a training step whose loss is not finite, without reading the loss back to the host.

A skipped step must leave the run exactly as it was: no optimizer update (weights and momentum unchanged) and
BatchNorm running statistics as before the forward pass (they change *during* the forward). :class:`StepGuard`
snapshots the state in a few fused operations per dtype (``torch.cat`` of the flattened tensors, restored with one
``torch._foreach_copy_``) instead of one clone per tensor, and decides in one of two ways:

* ``device_side=False`` (CPU default): the finiteness flag is read on the host before the backward pass. On CPU
  this costs nothing (kernels run synchronously), and a skipped step also skips its backward pass.
* ``device_side=True`` (GPU default): the backward pass and the optimizer step always run; afterwards every
  tensor the step may have changed is set to ``torch.where(ok, new, saved)``, so the host never waits for the
  GPU. A finite step keeps the optimizer's own result bit for bit. The first optimizer step of a run (or of a
  resumed run) still takes the host path once: it creates the optimizer state (SGD momentum buffers), which an
  on-device select cannot undo.

Under DDP the flag is all-reduced on the device, so all ranks skip together (a rank that stepped alone would leave
the others' gradient all-reduce waiting).
"""

from __future__ import annotations

from collections import defaultdict

import torch


def all_ranks_ok(ok: torch.Tensor) -> torch.Tensor:
    """``ok`` (0-dim bool) AND-ed over the ranks of the process group, on the device (no host sync).

    Returns ``ok`` itself outside ``torch.distributed`` or with one rank.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    bad = (~ok).to(torch.float32).reshape(1)
    dist.all_reduce(bad)
    return bad[0] == 0


class _Snapshot:
    """Flat copies of a list of tensors, one ``torch.cat`` per (dtype, device) group."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = defaultdict(list)
        for t in tensors:
            groups[(t.dtype, t.device)].append(t)
        self.groups = list(groups.values())
        # reshape(-1) is a view for contiguous tensors; channels_last weights are copied in logical order
        self.saved = [torch.cat([t.detach().reshape(-1) for t in group]) for group in self.groups]

    def restore(self, ok: torch.Tensor | None = None) -> None:
        """Write the saved values back (``ok=None``), or keep the current values where ``ok`` (0-dim bool) holds.

        Both are exact: ``torch.where`` selects elements, it computes nothing.
        """
        with torch.no_grad():
            for group, saved in zip(self.groups, self.saved):
                source = saved
                if ok is not None:
                    source = torch.where(ok, torch.cat([t.detach().reshape(-1) for t in group]), saved)
                parts = source.split([t.numel() for t in group])
                torch._foreach_copy_(group, [p.view(t.shape) for p, t in zip(parts, group)])


class StepGuard:
    """Undo one training step's effect on a model and its optimizer when the loss is not finite.

    Usage, per step: :meth:`begin` before the forward pass; then either the host path (:meth:`device_skip_ready`
    False: read the flag, :meth:`undo_forward` and return when it is False) or the device path
    (:meth:`before_update`, backward, ``optimizer.step()``, :meth:`after_update` with the flag).

    Args:
        model: the model trained (its non-empty buffers, e.g. BatchNorm running statistics, are guarded).
        optimizer: its optimizer (parameters and per-parameter state tensors are guarded on the device path).
        device_side: decide on the device (no host sync) once the optimizer state exists; see the module notes.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device_side: bool) -> None:
        self.model, self.optimizer, self.device_side = model, optimizer, device_side
        self._buffers: _Snapshot | None = None
        self._update: _Snapshot | None = None

    def begin(self) -> None:
        """Snapshot the model's buffers (call before the forward pass)."""
        self._buffers = _Snapshot([b for b in self.model.buffers() if b.numel()])

    def device_skip_ready(self) -> bool:
        """True when this step can skip on the device: ``device_side`` and every parameter has optimizer state
        (the state an update creates cannot be taken back by a select)."""
        if not self.device_side:
            return False
        state = self.optimizer.state
        return all(p in state and state[p] for group in self.optimizer.param_groups for p in group["params"])

    def undo_forward(self) -> None:
        """Host path, skipped step: put the buffers back as they were at :meth:`begin`."""
        if self._buffers is None:
            raise RuntimeError("StepGuard.undo_forward called before begin()")
        self._buffers.restore()

    def before_update(self) -> None:
        """Device path: snapshot the parameters and the optimizer state (call before the optimizer step)."""
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        for p in list(tensors):
            tensors.extend(v for v in self.optimizer.state[p].values() if isinstance(v, torch.Tensor) and v.numel())
        self._update = _Snapshot(tensors)

    def after_update(self, ok: torch.Tensor) -> None:
        """Device path: keep the step's changes where ``ok`` (0-dim bool on the device) holds, else undo them.

        Raises:
            RuntimeError: :meth:`begin` or :meth:`before_update` was not called for this step.
        """
        if self._buffers is None or self._update is None:
            raise RuntimeError("StepGuard.after_update needs begin() and before_update() first")
        self._buffers.restore(ok)
        self._update.restore(ok)
        self._update = None
