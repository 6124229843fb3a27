"""ALPNet few-shot segmenter: encoder + adaptive local prototype classifier + prototype-alignment loss.

Re-implementation of the original's ``models/grid_proto_fewshot.py`` (``FewShotSeg``, itself adapted from PANet
``models/fewshot.py``), docs/method.md#network and the sections after it. Differences from the original, all
behaviour-preserving for one episode:

* a batch of B episodes, each with S support shots and Q queries and its own prototypes (the original asserts
  B = 1, one way, one query); all B*(S+Q) images are encoded in one encoder batch, support first, so that in
  training mode BatchNorm sees support and query together as in the original (docs/method.md#q25-joint-batchnorm);
* empty-prototype cases are explicit (no exception-driven skipping, docs/method.md#q4-faulty-batch-skip): see
  :meth:`FewShotSeg.forward`;
* a fast evaluation path: :meth:`FewShotSeg.encode`, :meth:`FewShotSeg.prototypes_from_support` and
  :meth:`FewShotSeg.segment_with_prototypes` (encode one support once, reuse its prototypes for many slices).

ALP windows: ``train_window`` = feature_hw / proto_grid_size = 32 / 8 = 4 in training (and always in the
alignment loss), ``val_wsize`` = 2 in eval mode; the ``gridconv+`` eligibility rule always uses a 4x4 window
(docs/method.md#q13-rule-window-4x4).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.alpmodule import (
    FG_GLOBAL_RULE_WINDOW,
    MULTISHOT_RULES,
    THRESH,
    EmptyMaskError,
    MultiShotRule,
    Prototypes,
    compute_prototypes,
    resize_mask,
    score_classes,
)
from models.backbone import BackboneName, Encoder, EncoderInit
from models.losses import alignment_ce, support_labels

AlignEmptyFG = Literal["skip", "zero_prototype"]


@dataclass
class EpisodePrototypes:
    """BG and FG prototypes of one episode's support.

    Attributes:
        bg: Background prototypes (``gridconv``; ``mask`` with ``fallback=True`` when no window qualified).
        fg: Foreground prototypes (``gridconv+`` or ``mask``).
        window: ALP window they were pooled with.
    """

    bg: Prototypes
    fg: Prototypes
    window: int


@dataclass
class FewShotOutput:
    """Result of :meth:`FewShotSeg.forward`.

    Attributes:
        logits: (B*Q, 2, H, W) [S_bg, S_fg] upsampled to the image size, episode-major (row b*Q + q is query q
            of episode b), so ``labels.reshape(B*Q, H, W)`` lines up.
        align_loss: Scalar alignment loss, sum over episodes / B (a skipped episode adds 0); a 0 tensor when the
            loss is not computed.
        fg_modes: Per episode, the FG prototype mode used (``gridconv+`` or ``mask``).
        bg_fallback: Per episode, True when no support BG window passed the threshold (global BG prototype used).
        align_empty_fg: Episodes whose predicted query FG (32x32 argmax) was empty in the alignment loss.
        align_skipped: Of those, episodes whose alignment term was dropped (``align_empty_fg="skip"``).
        align_bg_fallback: Episodes whose predicted query BG had no window > threshold (global BG prototype,
            docs/method.md#q14-no-background-window).
    """

    logits: torch.Tensor
    align_loss: torch.Tensor
    fg_modes: list[str] = field(default_factory=list)
    bg_fallback: list[bool] = field(default_factory=list)
    align_empty_fg: int = 0
    align_skipped: int = 0
    align_bg_fallback: int = 0


class FewShotSeg(nn.Module):
    """ALPNet: shared encoder and a parameter-free ALP classifier; 1-way, any number of shots and queries.

    Args:
        backbone: Encoder trunk (``dlfcn_res101`` paper, ``dlfcn_res50``, ``lite_gn`` CPU demo).
        init: Encoder init, ``coco`` | ``imagenet`` | ``none`` (see :class:`models.backbone.Encoder`).
        weights_path: Local encoder weights file (overrides ``init``'s pretrained file).
        proto_grid_size: Training ALP grid; the training window is ``feature_hw // proto_grid_size``.
        feature_hw: Nominal feature size (32, 32) for 256x256 input; only used to derive the training window.
        val_wsize: ALP window in eval mode.
        thresh: Keep threshold of local prototypes (> thresh) and of the ``gridconv+`` rule (>= thresh).
        fg_global_rule_window: Window of the ``gridconv+`` eligibility rule (4, hard-coded in the original,
            docs/method.md#q13-rule-window-4x4).
        use_align: Compute the alignment loss in training mode.
        align_empty_fg: What the alignment loss does when the predicted query FG is empty: ``skip`` drops the
            term for that episode (default; the support FG cannot be scored against a non-existent FG prototype),
            ``zero_prototype`` keeps it with the original's all-zero FG prototype (S_fg = 0 everywhere, parity).
        build_unused_aspp: Build the original's unused ASPP modules (663-key state dict, docs/method.md#q7-unused-aspp).
        multishot_proto: Foreground global prototypes with several support shots (docs/method.md#several-shots):
            ``per_shot`` (the original's rule, default) or ``pooled``; see :func:`models.alpmodule.compute_prototypes`.

    Attributes:
        encoder: :class:`models.backbone.Encoder`.
        train_window: ALP window in training mode and in the alignment loss.
        allow_empty_support: Accept an empty support foreground (all-zero FG prototype) instead of raising
            :class:`EmptyMaskError`; set by ``training.py`` for ``episode_sampling="legacy"`` only.
    """

    def __init__(
        self,
        backbone: BackboneName = "dlfcn_res101",
        init: EncoderInit = "coco",
        weights_path: str | os.PathLike[str] | None = None,
        proto_grid_size: int = 8,
        feature_hw: tuple[int, int] = (32, 32),
        val_wsize: int = 2,
        thresh: float = THRESH,
        fg_global_rule_window: int = FG_GLOBAL_RULE_WINDOW,
        use_align: bool = True,
        align_empty_fg: AlignEmptyFG = "skip",
        build_unused_aspp: bool = False,
        multishot_proto: MultiShotRule = "per_shot",
    ) -> None:
        super().__init__()
        windows = {int(side) // int(proto_grid_size) for side in feature_hw}
        if len(windows) != 1 or min(windows) < 1:
            raise ValueError(f"feature_hw {feature_hw} / proto_grid_size {proto_grid_size} must give one window >= 1")
        if align_empty_fg not in ("skip", "zero_prototype"):
            raise ValueError(f"align_empty_fg must be 'skip' or 'zero_prototype', got {align_empty_fg!r}")
        self.encoder = Encoder(backbone, init=init, weights_path=weights_path, build_unused_aspp=build_unused_aspp)
        self.train_window = windows.pop()
        self.val_wsize = int(val_wsize)
        self.thresh = float(thresh)
        self.fg_global_rule_window = int(fg_global_rule_window)
        self.use_align = bool(use_align)
        self.align_empty_fg = align_empty_fg
        if multishot_proto not in MULTISHOT_RULES:
            raise ValueError(f"multishot_proto must be one of {MULTISHOT_RULES}, got {multishot_proto!r}")
        self.multishot_proto = multishot_proto
        # True only for episode_sampling="legacy" (parity, docs/method.md#q2-superpixel-numbering): an empty support
        # foreground is scored against the all-zero FG prototype (S_fg = 0 everywhere) and trained on, as the original
        # does, instead of raising.
        self.allow_empty_support = False

    #: config keys (the Sacred config's names) that :meth:`from_config` passes to the constructor
    CONFIG_KEYS = ("proto_grid_size", "feature_hw", "val_wsize", "build_unused_aspp", "multishot_proto")

    @classmethod
    def from_config(cls, config: dict[str, Any], backbone: str | None = None, init: EncoderInit = "none",
                    weights_path: str | os.PathLike[str] | None = None) -> FewShotSeg:
        """The model a run's config describes: the one builder for training, validation and ``predict.py``.

        Args:
            config: a run's config (``checkpoint["config"]``); keys of :attr:`CONFIG_KEYS` that it lacks (a plain
                state dict has no config) take the constructor's defaults, the paper's values.
            backbone: the backbone when the config has no ``modelname``.
            init, weights_path: the encoder's initialisation (:class:`models.backbone.Encoder`).

        Raises:
            ValueError: no backbone in the config or the arguments.
        """
        name = config.get("modelname") or backbone
        if name is None:
            raise ValueError("the config names no backbone (modelname) and none was given")
        kwargs = {k: config[k] for k in cls.CONFIG_KEYS if k in config}
        if "feature_hw" in kwargs:
            kwargs["feature_hw"] = tuple(kwargs["feature_hw"])
        return cls(backbone=name, init=init, weights_path=weights_path, **kwargs)

    # ------------------------------------------------------------------------------------------- building blocks

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encode images: (N, 3, H, W) -> (N, 256, h, w), h = ceil(H / 8).

        When the encoder's weights are in ``channels_last`` layout (``model.to(memory_format=torch.channels_last)``),
        the batch is converted to that layout too, so convolutions run without layout conversions.
        """
        if self.encoder_channels_last():
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        return self.encoder(imgs)

    def encoder_channels_last(self) -> bool:
        """True when the encoder's first spatial (k > 1) convolution holds its weight in channels_last layout."""
        for module in self.encoder.modules():
            if isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1:
                weight = module.weight
                return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        return False

    def current_window(self, window: int | None = None) -> int:
        """``window`` if given, else the training window in training mode and ``val_wsize`` in eval mode."""
        if window is not None:
            return int(window)
        return self.train_window if self.training else self.val_wsize

    def prototypes_from_support(
        self,
        supp_feats: torch.Tensor,
        supp_fg: torch.Tensor,
        supp_bg: torch.Tensor,
        window: int | None = None,
    ) -> EpisodePrototypes:
        """BG and FG prototypes of one support set (several shots combined by ``multishot_proto``).

        Args:
            supp_feats: (S, C, h, w) support features from :meth:`encode`.
            supp_fg: (S, H, W) support foreground masks at image size.
            supp_bg: (S, H, W) support background masks at image size.
            window: ALP window; default :meth:`current_window`.

        Returns:
            :class:`EpisodePrototypes`.

        Raises:
            EmptyMaskError: the support foreground is empty at image size.
        """
        if supp_fg.shape != supp_bg.shape or supp_fg.dim() != 3 or supp_fg.shape[0] != supp_feats.shape[0]:
            raise ValueError(
                f"support masks (S, H, W) fg {tuple(supp_fg.shape)} / bg {tuple(supp_bg.shape)} do not match "
                f"features (S, C, h, w) {tuple(supp_feats.shape)}"
            )
        if not self.allow_empty_support and not bool((supp_fg > 0).any()):
            raise EmptyMaskError(f"support foreground mask is empty (all {supp_fg.shape[0]} shot(s))")
        win = self.current_window(window)
        size = tuple(supp_feats.shape[-2:])
        fg_small = resize_mask(supp_fg, size)
        bg_small = resize_mask(supp_bg, size)
        bg = compute_prototypes(supp_feats, bg_small, win, "gridconv", self.thresh, self.fg_global_rule_window)
        # A foreground that is non-empty at image size but vanishes in the bilinear downsampling (a few border
        # pixels) gives the original's all-zero prototype (S_fg = 0) rather than an error.
        fg = compute_prototypes(supp_feats, fg_small, win, "gridconv+", self.thresh, self.fg_global_rule_window,
                                allow_empty=True, multishot=self.multishot_proto)
        return EpisodePrototypes(bg=bg, fg=fg, window=win)

    @staticmethod
    def score_small(feats: torch.Tensor, protos: EpisodePrototypes) -> torch.Tensor:
        """[S_bg, S_fg] at feature size: (N, C, h, w) -> (N, 2, h, w)."""
        return score_classes(feats, [protos.bg, protos.fg])

    def segment_with_prototypes(
        self, qry_feats: torch.Tensor, protos: EpisodePrototypes, out_size: tuple[int, int]
    ) -> torch.Tensor:
        """Logits of many query slices against cached support prototypes.

        Args:
            qry_feats: (N, C, h, w) query features from :meth:`encode`.
            protos: Output of :meth:`prototypes_from_support`.
            out_size: Image size (H, W).

        Returns:
            (N, 2, H, W) logits [S_bg, S_fg], bilinearly upsampled (align_corners=False).
        """
        small = self.score_small(qry_feats, protos)
        return F.interpolate(small, size=tuple(out_size), mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------------------------------- alignment loss

    def alignment_loss(
        self,
        qry_feats: torch.Tensor,
        qry_pred_small: torch.Tensor,
        supp_feats: torch.Tensor,
        supp_fg: torch.Tensor,
        supp_bg: torch.Tensor,
    ) -> tuple[torch.Tensor | None, bool, bool]:
        """PANet-style prototype alignment for one episode (docs/method.md#losses), with the roles of support and query
        swapped.

        Hard query masks come from the argmax of the feature-size query prediction; prototypes are pooled from the
        query features (BG ``gridconv``, FG ``gridconv+``/``mask`` by the rule) with the training window; the
        support features are segmented, upsampled to image size and compared with the support label by unweighted
        CE (ignore 255), averaged over shots.

        Empty cases: an empty predicted query FG returns None (``skip``) or uses the all-zero FG prototype
        (``zero_prototype``); no query BG window > threshold (all-FG prediction) uses the global BG prototype
        (the zero vector if the prediction has no BG at all, giving S_bg = 0).

        Args:
            qry_feats: (Q, C, h, w) query features.
            qry_pred_small: (Q, 2, h, w) query prediction at feature size.
            supp_feats: (S, C, h, w) support features.
            supp_fg: (S, H, W) support foreground masks.
            supp_bg: (S, H, W) support background masks.

        Returns:
            ``(loss or None, predicted_fg_was_empty, bg_fallback)``.
        """
        pred = qry_pred_small.argmax(dim=1, keepdim=True)  # (Q, 1, h, w), no gradient through the masks
        qry_fg = (pred == 1).to(qry_feats.dtype)
        qry_bg = (pred == 0).to(qry_feats.dtype)
        empty_fg = not bool(qry_fg.any())
        if empty_fg and self.align_empty_fg == "skip":
            return None, True, False
        win = self.train_window
        bg = compute_prototypes(qry_feats, qry_bg, win, "gridconv", self.thresh, self.fg_global_rule_window)
        fg = compute_prototypes(
            qry_feats, qry_fg, win, "gridconv+", self.thresh, self.fg_global_rule_window, allow_empty=True,
            multishot=self.multishot_proto,
        )
        protos = EpisodePrototypes(bg=bg, fg=fg, window=win)
        supp_logits = self.segment_with_prototypes(supp_feats, protos, tuple(supp_fg.shape[-2:]))
        loss = alignment_ce(supp_logits, support_labels(supp_fg, supp_bg))
        return loss, empty_fg, bg.fallback

    # ------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        supp_imgs: torch.Tensor,
        supp_fg: torch.Tensor,
        supp_bg: torch.Tensor,
        qry_imgs: torch.Tensor,
        window: int | None = None,
        compute_align: bool | None = None,
    ) -> FewShotOutput:
        """Segment the queries of B one-way episodes.

        Args:
            supp_imgs: (B, S, 3, H, W) support images.
            supp_fg: (B, S, H, W) support foreground masks (binary or soft).
            supp_bg: (B, S, H, W) support background masks.
            qry_imgs: (B, Q, 3, H, W) query images.
            window: ALP window override; default ``train_window`` in training mode, ``val_wsize`` in eval mode.
            compute_align: Compute the alignment loss; default ``self.training and use_align``.

        Returns:
            :class:`FewShotOutput` (logits (B*Q, 2, H, W), align_loss, diagnostics).

        Raises:
            EmptyMaskError: an episode's support foreground is empty (the training sampler must avoid it).
        """
        if supp_imgs.dim() != 5 or qry_imgs.dim() != 5 or supp_imgs.shape[2] != 3 or qry_imgs.shape[2] != 3:
            raise ValueError(
                f"expected supp_imgs (B, S, 3, H, W) and qry_imgs (B, Q, 3, H, W), got {tuple(supp_imgs.shape)} "
                f"and {tuple(qry_imgs.shape)}"
            )
        n_ep, n_shot, _, height, width = supp_imgs.shape
        n_qry = qry_imgs.shape[1]
        if qry_imgs.shape[0] != n_ep or qry_imgs.shape[-2:] != supp_imgs.shape[-2:]:
            raise ValueError(f"qry_imgs {tuple(qry_imgs.shape)} does not match supp_imgs {tuple(supp_imgs.shape)}")
        for name, mask in (("supp_fg", supp_fg), ("supp_bg", supp_bg)):
            if tuple(mask.shape) != (n_ep, n_shot, height, width):
                raise ValueError(f"{name} must be (B, S, H, W) = {(n_ep, n_shot, height, width)}, "
                                 f"got {tuple(mask.shape)}")
        do_align = (self.training and self.use_align) if compute_align is None else bool(compute_align)

        # one encoder batch for all support and query images (BatchNorm as in the original,
        # docs/method.md#q25-joint-batchnorm)
        feats = self.encode(torch.cat([supp_imgs.flatten(0, 1), qry_imgs.flatten(0, 1)], dim=0))
        supp_feats = feats[: n_ep * n_shot].unflatten(0, (n_ep, n_shot))  # (B, S, C, h, w)
        qry_feats = feats[n_ep * n_shot :].unflatten(0, (n_ep, n_qry))  # (B, Q, C, h, w)

        out = FewShotOutput(logits=feats.new_zeros(0), align_loss=feats.new_zeros(()))
        logits, align_terms = [], []
        for b in range(n_ep):
            if not self.allow_empty_support and not bool((supp_fg[b] > 0).any()):
                raise EmptyMaskError(f"episode {b} of {n_ep}: support foreground mask is empty")
            protos = self.prototypes_from_support(supp_feats[b], supp_fg[b], supp_bg[b], window)
            out.fg_modes.append(protos.fg.mode)
            out.bg_fallback.append(protos.bg.fallback)
            pred_small = self.score_small(qry_feats[b], protos)  # (Q, 2, h, w)
            logits.append(F.interpolate(pred_small, size=(height, width), mode="bilinear", align_corners=False))
            if do_align:
                loss, empty_fg, bg_fallback = self.alignment_loss(
                    qry_feats[b], pred_small, supp_feats[b], supp_fg[b], supp_bg[b]
                )
                out.align_empty_fg += int(empty_fg)
                out.align_bg_fallback += int(bg_fallback)
                if loss is None:
                    out.align_skipped += 1
                else:
                    align_terms.append(loss)
        out.logits = torch.cat(logits, dim=0)
        if align_terms:
            out.align_loss = torch.stack(align_terms).sum() / n_ep
        return out
