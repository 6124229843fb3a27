"""Feature encoder of ALPNet: a dilated CNN trunk (output stride 8) followed by a 1x1 projection to 256 channels.

Re-implementation of the original's ``models/backbone/torchvision_backbones.py`` (docs/method.md#network). The
attributes are named ``backbone`` and ``localconv`` so that, inside ``FewShotSeg`` (attribute ``encoder``), the
state-dict keys are the original's ``encoder.backbone.*`` and ``encoder.localconv.weight``.

Backbones (``name``):

* ``dlfcn_res101`` (paper): the ``.backbone`` of torchvision ``deeplabv3_resnet101(num_classes=21, aux_loss=None)``,
  i.e. ResNet-101 with ``replace_stride_with_dilation=[False, True, True]`` wrapped in an ``IntermediateLayerGetter``
  that returns layer4 (2048 channels, output stride 8); 42.50 M parameters.
* ``dlfcn_res50``: the same with ResNet-50 (23.51 M).
* ``lite_gn``, ``lite_gn_s``: small GroupNorm CNNs for CPU demos, no pretrained weights (see :class:`LiteGNBackbone`).

``localconv`` is a 1x1 conv (C -> 256) without bias and without BN/ReLU after it (default PyTorch init), so for a
256x256 input the encoder returns 256x32x32 features.

Initialisation (docs/method.md#q15-encoder-init): ``init="coco"`` loads torchvision's COCO DeepLabV3 weights,
``"imagenet"`` the ImageNet ResNet weights, ``"none"`` keeps the random init and never touches the network. Pretrained
files are taken from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) when present and downloaded otherwise;
offline, a :class:`models.weights.PretrainedWeightsUnavailable` error says where to put the file. ``weights_path`` loads
a local file instead (torchvision DeepLabV3, plain backbone, or original SSL-ALPNet checkpoint layouts).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, ResNet101_Weights
from torchvision.models.segmentation import (
    DeepLabV3_ResNet50_Weights,
    DeepLabV3_ResNet101_Weights,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
)

from models.aspp import build_unused_aspp_modules
from models.weights import fetch_pretrained, load_encoder_weights

BackboneName = Literal["dlfcn_res101", "dlfcn_res50", "lite_gn", "lite_gn_s"]
#: widths (s1, s2, c) of the light CPU backbones (see :class:`LiteGNBackbone`)
LITE_WIDTHS: dict[str, tuple[int, int, int]] = {"lite_gn": (32, 48, 128), "lite_gn_s": (24, 32, 96)}
EncoderInit = Literal["coco", "imagenet", "none"]
FEATURE_CHANNELS = 256  # output channels of localconv
OUTPUT_STRIDE = 8

# name -> (torchvision builder, COCO weights enum, ImageNet weights enum, description)
_RESNETS: dict[str, tuple[Callable[..., nn.Module], object, object, str]] = {
    "dlfcn_res101": (
        deeplabv3_resnet101,
        DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
        ResNet101_Weights.IMAGENET1K_V1,
        "ResNet101",
    ),
    "dlfcn_res50": (
        deeplabv3_resnet50,
        DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
        ResNet50_Weights.IMAGENET1K_V1,
        "ResNet50",
    ),
}
BACKBONES: tuple[str, ...] = (*_RESNETS, *LITE_WIDTHS)

_WAYS_OUT = (
    "  - or pass a local weights file: backbone_weights=<local file> (Encoder weights_path=...);\n"
    "  - or start from random init: use_coco_init=False (Encoder init='none').\n"
)


# ----------------------------------------------------------------------------------------------- light backbone


def _conv_gn_relu(c_in: int, c_out: int, stride: int = 1, dilation: int = 1, groups: int = 8) -> nn.Sequential:
    """3x3 conv (no bias) -> GroupNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
    )


class _ResidualGN(nn.Module):
    """Basic residual block: two 3x3 convs (same dilation) with GroupNorm, identity shortcut."""

    def __init__(self, channels: int, dilation: int = 1, groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.gn1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, h, w) -> (N, C, h, w)."""
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.gn2(self.conv2(y))
        return self.relu(y + x)


class LiteGNBackbone(nn.Module):
    """Small GroupNorm CNN with output stride 8, for CPU demos (``lite_gn``: ~1 M parameters, 128 channels).

    Architecture (input N x 3 x H x W; every conv 3x3 without bias, followed by GroupNorm(8) + ReLU), with the
    widths ``(s1, s2, c)`` = (32, 48, 128) for ``lite_gn`` and (24, 32, 96) for ``lite_gn_s``::

        stem   conv 3->s1  stride 2                          H/2
               conv s1->s2 stride 2                          H/4
               residual block s2 (2 convs)                   H/4
        down   conv s2->c stride 2                           H/8
        body   residual block c, dilation 1                  H/8
               residual block c, dilation 2                  H/8
               residual block c, dilation 4                  H/8   -> N x c x H/8 x W/8

    Most parameters and FLOPs sit at H/8, where a 256x256 input gives the paper's 32x32 feature map; the
    dilations 1/2/4 give a receptive field of about 150 px. GroupNorm (not BatchNorm) makes the features
    independent of the batch, so support and query encoded together or apart give the same result. Convs use
    Kaiming-normal (fan_out) init, norms weight 1 / bias 0, and the last GroupNorm of each residual block starts at
    weight 0 (each block starts as identity), which helps training from scratch.

    ``lite_gn_s`` (the demo's backbone since it replaced ``lite_gn``) has the same depth and receptive field at 0.55 M
    parameters; a forward and backward pass on two 256x256 slices takes about 0.6x the time of ``lite_gn``'s on the
    2-core CPU (0.57x-0.63x in two runs, docs/demo.md).
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 48, 128), dilations: tuple[int, ...] = (1, 2, 4),
                 groups: int = 8) -> None:
        super().__init__()
        s1, s2, c = widths
        self.out_channels = c
        self.stem = nn.Sequential(
            _conv_gn_relu(3, s1, stride=2, groups=groups),
            _conv_gn_relu(s1, s2, stride=2, groups=groups),
            _ResidualGN(s2, groups=groups),
        )
        self.down = _conv_gn_relu(s2, c, stride=2, groups=groups)
        self.body = nn.Sequential(*[_ResidualGN(c, d, groups) for d in dilations])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, _ResidualGN):
                nn.init.zeros_(module.gn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) -> (N, c, ceil(H/8), ceil(W/8))."""
        return self.body(self.down(self.stem(x)))


# ----------------------------------------------------------------------------------------------- encoder


class Encoder(nn.Module):
    """Trunk + 1x1 projection: images (N, 3, H, W) -> features (N, 256, H/8, W/8).

    Args:
        name: Backbone, one of ``dlfcn_res101`` (paper), ``dlfcn_res50``, ``lite_gn``, ``lite_gn_s`` (CPU demos).
        init: ``coco`` (torchvision COCO DeepLabV3 weights), ``imagenet`` (ResNet ImageNet weights) or ``none``
            (random init, no network access). ``lite_gn`` and ``lite_gn_s`` only support ``none``.
        weights_path: Local weights file loaded instead of ``init``'s pretrained file (any ``init``); layouts: a
            torchvision DeepLabV3 state dict, a plain backbone state dict, or an original SSL-ALPNet checkpoint (the
            latter also sets ``localconv``).
        build_unused_aspp: Also build the original's unused ASPP modules (parity of the 663-key state dict,
            docs/method.md#q7-unused-aspp).
            They are never called in ``forward``.

    Attributes:
        backbone: The trunk (torchvision ``IntermediateLayerGetter`` for ResNets, :class:`LiteGNBackbone`).
        localconv: 1x1 conv, trunk channels -> 256, no bias.
        init_source: Where the trunk weights came from (for logs and checkpoints).

    Raises:
        ValueError: unknown backbone, or pretrained init requested for a ``lite_gn*`` backbone.
        models.weights.PretrainedWeightsUnavailable: pretrained weights neither cached nor downloadable.
        models.weights.StateDictMismatchError: ``weights_path`` does not fit the backbone.
    """

    def __init__(
        self,
        name: BackboneName = "dlfcn_res101",
        init: EncoderInit = "coco",
        weights_path: str | os.PathLike[str] | None = None,
        build_unused_aspp: bool = False,
    ) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
        if init not in ("coco", "imagenet", "none"):
            raise ValueError(f"unknown encoder init {init!r}; choose 'coco', 'imagenet' or 'none'")
        self.name = name
        pretrained_file = None
        if name in LITE_WIDTHS:
            if init != "none":
                raise ValueError(
                    f"backbone {name!r} has no pretrained weights (init={init!r}); use init='none' "
                    "(use_coco_init=False) or pass a local file as weights_path"
                )
            if build_unused_aspp:
                raise ValueError("build_unused_aspp only applies to the ResNet backbones (2048-channel trunk)")
            self.backbone: nn.Module = LiteGNBackbone(LITE_WIDTHS[name])
            trunk_channels = self.backbone.out_channels
        else:
            builder, coco, imagenet, arch = _RESNETS[name]
            if weights_path is None and init != "none":
                # resolve the file before building the net: fail fast, with the cache path in the message
                enum = coco if init == "coco" else imagenet
                what = f"COCO DeepLabV3-{arch}" if init == "coco" else f"ImageNet {arch}"
                pretrained_file = fetch_pretrained(enum.url, f"{what} (encoder init {init!r})", _WAYS_OUT)
            # weights=None and weights_backbone=None: torchvision itself never downloads anything
            self.backbone = builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=None).backbone
            trunk_channels = 2048
        self.localconv = nn.Conv2d(trunk_channels, FEATURE_CHANNELS, kernel_size=1, bias=False)
        if build_unused_aspp:
            self.aspp_out, self.asppconv = build_unused_aspp_modules()

        self.init_source = "random"
        if weights_path is not None:
            parts = load_encoder_weights(self, weights_path)
            self.init_source = f"file:{weights_path} ({parts.layout})"
        elif pretrained_file is not None:
            load_encoder_weights(self, pretrained_file)
            self.init_source = f"{init}:{pretrained_file}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            x: Images (N, 3, H, W).

        Returns:
            Features (N, 256, h, w) with h = ceil(H / 8), w = ceil(W / 8).
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Encoder expects images (N, 3, H, W), got {tuple(x.shape)}")
        out = self.backbone(x)
        if isinstance(out, dict):  # torchvision IntermediateLayerGetter
            out = out["out"]
        return self.localconv(out)
