"""Encoder initialisation files and checkpoint compatibility with the original SSL-ALPNet.

Three jobs (docs/method.md#checkpoint-layout):

* Find torchvision's pretrained files (COCO DeepLabV3, ImageNet ResNet) in the torch hub cache without network,
  download them only when asked and possible, and turn a failed download into one readable
  :class:`PretrainedWeightsUnavailable` error (no urllib stack trace).
* Load a local encoder weights file whatever its layout: a torchvision DeepLabV3 state dict (``backbone.*``), a
  plain ResNet/backbone state dict (``conv1.*``, ``layer1.*``), or an original SSL-ALPNet checkpoint
  (``encoder.backbone.*`` + ``encoder.localconv.weight``). The layout is detected from the key prefixes.
* Load an original SSL-ALPNet checkpoint (663 keys) into :class:`models.grid_proto_fewshot.FewShotSeg`, ignoring
  the unused ``encoder.aspp*`` keys, and export a state dict with the original's names.

Every ``torch.load`` uses ``weights_only=True`` and an explicit ``map_location``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torch.hub
from torch import nn

from models.aspp import build_unused_aspp_modules
from util.checkpoint import strip_wrapper_prefixes
from util.errors import ProjectError

ASPP_PREFIX = "encoder.aspp"  # aspp_out.*, asppconv.weight: built, never used (docs/method.md#q7-unused-aspp)
_SHOW = 5  # how many offending keys an error message lists


class PretrainedWeightsUnavailable(ProjectError, RuntimeError):
    """Requested pretrained encoder weights are neither cached nor downloadable (e.g. no network)."""


class StateDictMismatchError(ProjectError, ValueError):
    """A weights file does not fit the model: missing, unexpected or wrongly shaped keys."""


# ----------------------------------------------------------------------------------------------- pretrained cache


def expected_cache_path(url: str) -> Path:
    """Path where torch hub caches (and where this module looks for) the file behind ``url``.

    Args:
        url: Download URL of a torchvision weights file.

    Returns:
        ``$TORCH_HOME/hub/checkpoints/<filename>`` (``torch.hub.get_dir()`` honours ``TORCH_HOME``).
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def find_cached_weights(url: str) -> Path | None:
    """Look for the file behind ``url`` in the torch cache, without any network access.

    Besides the current location (:func:`expected_cache_path`) this also accepts the layout of torch <= 1.5, which
    the original used with ``TORCH_HOME=./pretrained_model``: ``$TORCH_HOME/checkpoints/<filename>``.

    Args:
        url: Download URL of a torchvision weights file.

    Returns:
        The cached file, or None when it is not there.
    """
    current = expected_cache_path(url)
    legacy = Path(torch.hub.get_dir()).parent / "checkpoints" / current.name
    for candidate in (current, legacy):
        if candidate.is_file():
            return candidate
    return None


def fetch_pretrained(url: str, description: str, alternatives: str) -> Path:
    """Return the local file for ``url``: from the cache if present, otherwise downloaded into the cache.

    Only the download itself is guarded: a ``URLError``/``OSError`` from it becomes
    :class:`PretrainedWeightsUnavailable`, whose message names the exact cache path and the alternatives.

    Args:
        url: Download URL of a torchvision weights file (its name carries the SHA-256 prefix that is checked).
        description: What the weights are, for the message (e.g. "COCO DeepLabV3-ResNet101").
        alternatives: Extra ways out for the message (config switches), one per line.

    Returns:
        Path of the cached file.

    Raises:
        PretrainedWeightsUnavailable: not cached and the download failed.
    """
    cached = find_cached_weights(url)
    if cached is not None:
        return cached
    target = expected_cache_path(url)
    match = torch.hub.HASH_REGEX.search(target.name)
    hash_prefix = match.group(1) if match else None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"Downloading {description} weights: {url} -> {target}")
        torch.hub.download_url_to_file(url, str(target), hash_prefix, progress=True)
    except (URLError, OSError) as err:  # network down, DNS, refused, read-only cache dir
        reason = getattr(err, "reason", None) or err
        raise PretrainedWeightsUnavailable(
            f"{description} weights are not cached and could not be downloaded ({type(err).__name__}: {reason}).\n"
            f"Ways out:\n"
            f"  - put {target.name} (from {url}) at {target}  (torch cache dir; set TORCH_HOME to move it);\n"
            f"{alternatives}"
        ) from None
    return target


# ----------------------------------------------------------------------------------------------- state-dict files


def load_state_dict_file(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` with ``torch.load(weights_only=True)``.

    A training checkpoint ``{"model": state_dict, ...}`` or ``{"state_dict": ...}`` is unwrapped, and wrapper
    prefixes (DataParallel/DDP ``module.``, ``torch.compile`` ``_orig_mod.``) are removed.

    Args:
        path: File written by ``torch.save``.
        map_location: Where tensors are loaded.

    Returns:
        Flat mapping key -> tensor.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        StateDictMismatchError: the file holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    return normalise_state_dict(obj, source=str(path))


def normalise_state_dict(obj: object, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Unwrap ``{"model": ...}``/``{"state_dict": ...}`` and strip wrapper prefixes (:func:`strip_wrapper_prefixes`).

    Args:
        obj: Loaded object.
        source: Name used in error messages.

    Returns:
        Flat mapping key -> tensor.

    Raises:
        StateDictMismatchError: ``obj`` is not a mapping of tensors.
    """
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise StateDictMismatchError(f"{source}: not a (non-empty) state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise StateDictMismatchError(f"{source}: entries that are not tensors, e.g. {bad[:_SHOW]}")
    return strip_wrapper_prefixes(obj)


def _describe_mismatch(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str
) -> str | None:
    """Message listing the first missing, unexpected and wrongly shaped keys, or None when all fit."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return None
    lines = [f"{source} does not fit the model (wrong architecture or backbone?)"]
    for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            lines.append(f"  {len(items)} {name} keys, first: {items[:_SHOW]}")
    return "\n".join(lines)


def check_state_dict_fits(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise :class:`StateDictMismatchError` unless ``given`` has exactly the keys and shapes of ``expected``.

    Args:
        expected: A module's ``state_dict()``.
        given: The state dict to load.
        source: File or description named in the message.
    """
    message = _describe_mismatch(expected, given, source)
    if message is not None:
        raise StateDictMismatchError(message)


# ----------------------------------------------------------------------------------------------- encoder init


@dataclass
class EncoderWeights:
    """Backbone (and optionally localconv) tensors extracted from a weights file.

    Attributes:
        layout: Detected layout: "original" (SSL-ALPNet checkpoint), "deeplabv3" (torchvision segmentation model)
            or "backbone" (plain ResNet / backbone state dict).
        backbone: Backbone state dict with the encoder's ``backbone.`` prefix removed.
        localconv: ``encoder.localconv.weight`` when the file has it (original layout only).
    """

    layout: str
    backbone: dict[str, torch.Tensor]
    localconv: torch.Tensor | None = None


def split_encoder_weights(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> EncoderWeights:
    """Detect the layout of an encoder weights state dict from its key prefixes.

    * ``encoder.backbone.*`` -> original SSL-ALPNet checkpoint (also carries ``encoder.localconv.weight``;
      ``encoder.aspp*`` is dropped);
    * ``backbone.*`` -> torchvision DeepLabV3 (``classifier.*``/``aux_classifier.*`` heads dropped);
    * anything else -> plain backbone state dict (an ImageNet classifier head ``fc.*`` is dropped).

    Args:
        state: Flat state dict.
        source: Name for error messages.

    Returns:
        The extracted tensors.
    """
    if any(k.startswith("encoder.backbone.") for k in state):
        backbone = {k[len("encoder.backbone.") :]: v for k, v in state.items() if k.startswith("encoder.backbone.")}
        return EncoderWeights("original", backbone, state.get("encoder.localconv.weight"))
    if any(k.startswith("backbone.") for k in state):
        backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        return EncoderWeights("deeplabv3", backbone)
    return EncoderWeights("backbone", {k: v for k, v in state.items() if not k.startswith("fc.")})


def load_encoder_weights(
    encoder: nn.Module, weights: str | os.PathLike[str] | Mapping[str, torch.Tensor]
) -> EncoderWeights:
    """Load a local weights file (or state dict) into ``encoder.backbone`` (and ``encoder.localconv`` if present).

    The backbone part must fit exactly (same keys and shapes), otherwise a :class:`StateDictMismatchError` lists
    the first offending keys. ``localconv`` is only taken from original SSL-ALPNet checkpoints; other layouts keep
    its random init.

    Args:
        encoder: A :class:`models.backbone.Encoder` (attributes ``backbone`` and ``localconv``).
        weights: File path or already loaded state dict.

    Returns:
        What was found in the file.
    """
    if isinstance(weights, Mapping):
        source, state = "<state dict>", normalise_state_dict(weights)
    else:
        source, state = str(weights), load_state_dict_file(weights)
    parts = split_encoder_weights(state, source)
    check_state_dict_fits(encoder.backbone.state_dict(), parts.backbone, f"{source} ({parts.layout} layout)")
    encoder.backbone.load_state_dict(parts.backbone, strict=True)
    if parts.localconv is not None:
        check_state_dict_fits(encoder.localconv.state_dict(), {"weight": parts.localconv}, f"{source} (localconv)")
        encoder.localconv.load_state_dict({"weight": parts.localconv}, strict=True)
    return parts


# ----------------------------------------------------------------------------------------------- original checkpoints


@dataclass
class LoadReport:
    """What :func:`load_original_checkpoint` did.

    Attributes:
        loaded: Number of tensors copied into the model.
        ignored_aspp: ``encoder.aspp*`` keys dropped because the model does not build them
            (docs/method.md#q7-unused-aspp).
        missing: Model keys absent from the file (only non-empty with ``strict=False``).
        unexpected: File keys the model does not have (only non-empty with ``strict=False``).
    """

    loaded: int
    ignored_aspp: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_original_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> LoadReport:
    """Load an original SSL-ALPNet checkpoint (or one of ours) into a ``FewShotSeg``.

    ``encoder.aspp*`` keys are ignored unless the model was built with ``build_unused_aspp=True``; everything else
    must match exactly when ``strict`` (a wrong-architecture file raises :class:`StateDictMismatchError` listing the
    first missing/unexpected/mis-shaped keys).

    Args:
        model: Target model (``FewShotSeg``).
        path_or_state_dict: ``.pth`` file or state dict; a ``{"model": ...}`` training checkpoint is unwrapped.
        strict: Require an exact key match (after dropping unused aspp keys).
        map_location: Where tensors are loaded before copying.

    Returns:
        A :class:`LoadReport`.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, state = "<state dict>", normalise_state_dict(path_or_state_dict)
    else:
        source = str(path_or_state_dict)
        state = load_state_dict_file(path_or_state_dict, map_location=map_location)
    expected = model.state_dict()
    model_has_aspp = any(k.startswith(ASPP_PREFIX) for k in expected)
    ignored = [] if model_has_aspp else [k for k in state if k.startswith(ASPP_PREFIX)]
    state = {k: v for k, v in state.items() if model_has_aspp or not k.startswith(ASPP_PREFIX)}
    if strict:
        check_state_dict_fits(expected, state, source)
    else:
        shapes = {k: v for k, v in state.items() if k in expected and v.shape != expected[k].shape}
        message = _describe_mismatch({k: expected[k] for k in shapes}, shapes, source)
        if message is not None:
            raise StateDictMismatchError(message)
    result = model.load_state_dict(state, strict=strict)
    return LoadReport(
        loaded=len(state) - len(result.unexpected_keys),
        ignored_aspp=ignored,
        missing=list(result.missing_keys),
        unexpected=list(result.unexpected_keys),
    )


def export_original_state_dict(
    model: nn.Module, add_unused_aspp: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """State dict with the original's key names, on CPU, ready for ``torch.save``.

    Our names already are the original's (``encoder.backbone.*``, ``encoder.localconv.weight``). With
    ``add_unused_aspp`` the never-used ``encoder.aspp_out.*``/``encoder.asppconv.weight`` tensors (randomly
    initialised from ``seed``) are added when the model lacks them, so the original code can load the file with
    ``strict=True`` (663 keys for ResNet-101).

    Args:
        model: A ``FewShotSeg``.
        add_unused_aspp: Add the unused ASPP keys (only meaningful for the ResNet backbones).
        seed: Seed of the random init of the added ASPP tensors.

    Returns:
        CPU state dict.

    Raises:
        ValueError: ``add_unused_aspp`` for a model without a 2048-channel trunk (``lite_gn``).
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if add_unused_aspp and not any(k.startswith(ASPP_PREFIX) for k in state):
        localconv = state.get("encoder.localconv.weight")
        if localconv is None or localconv.shape[1] != 2048:
            raise ValueError("add_unused_aspp needs a ResNet encoder (2048-channel trunk); the original has no "
                             "other layout")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            aspp_out, asppconv = build_unused_aspp_modules()
        state.update({f"encoder.aspp_out.{k}": v for k, v in aspp_out.state_dict().items()})
        state.update({f"encoder.asppconv.{k}": v for k, v in asppconv.state_dict().items()})
    return state


def state_dict_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> str | None:
    """Why ``state`` does not fit ``model`` (first missing, unexpected and mis-shaped keys), or ``None`` if it fits.

    The original's unused ``encoder.aspp*`` keys are ignored unless the model builds them
    (docs/method.md#q7-unused-aspp).
    """
    expected = model.state_dict()
    if not any(k.startswith(ASPP_PREFIX) for k in expected):
        state = {k: v for k, v in state.items() if not k.startswith(ASPP_PREFIX)}
    try:
        check_state_dict_fits(expected, state, str(path))
    except StateDictMismatchError as err:
        return str(err)
    return None


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a checkpoint's ``model`` state dict into ``model``, strictly.

    Raises:
        StateDictMismatchError: another architecture; the message names ``path`` and the first offending keys.
    """
    message = state_dict_mismatch(model, state, path)
    if message is not None:
        raise StateDictMismatchError(message)
    load_original_checkpoint(model, state)
