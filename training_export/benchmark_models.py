"""Realistic-size models for timing: a MobileNetV2-class and a ResNet-50-class network.

The digits CNN is too small to say anything about serving real models (per-call overhead is all
it measures). These two have the real architectures' layers and costs, with random weights:
their answers mean nothing, so their cards say `benchmark_only`. No torchvision (it does not
install beside this torch), so the two are written out here, following the papers.

Random weights are made "decisive" the way a trained net is: BatchNorm statistics are set from
photo-like pictures (every layer sees normalised activations in eval mode, as after training),
and the classifier is sharpened, so top-1 has a margin and an INT8 agreement gate measures
quantization damage rather than coin flips between near-equal logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from image_classifier.core.decoding import DecodeLimits, decode_image
from image_classifier.core.preprocessing import IMAGENET_SPEC, PreprocessSpec, preprocess

from .export import export_and_save
from .photos import PHOTO_640, photo_jpeg
from .store import already_saved

LABELS = [f"class_{i:03d}" for i in range(1000)]
SEED = 0
# Photo seeds: BatchNorm statistics come from these; INT8 calibration and its gate use others.
STATS_SEEDS = range(10_000, 10_048)
CHECK_SEEDS = range(11_000, 11_008)
DESCRIPTION = "Random weights, for timing only: its answers mean nothing. {arch}, 224x224 RGB."


# --- MobileNetV2 (Sandler et al. 2018) -------------------------------------------------------


def _conv_bn(inp: int, out: int, kernel: int, stride: int, groups: int = 1, act: bool = True):
    layers = [
        nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
    ]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear project; a skip when the shape allows."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers = [_conv_bn(inp, hidden, 1, 1)] if expand != 1 else []
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, out, 1, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.skip = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.skip else self.block(x)


# (expansion t, channels c, repeats n, first stride s) from the paper's Table 2.
_MOBILENET_V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip


def _width(channels: float) -> int:
    return max(8, int(channels + 4) // 8 * 8)  # multiples of 8, as the reference does


def mobilenet_v2(classes: int = 1000, width: float = 1.0) -> nn.Module:
    channels = _width(32 * width)
    last = _width(1280 * max(1.0, width))
    layers: list[nn.Module] = [_conv_bn(3, channels, 3, 2)]
    for t, c, n, s in _MOBILENET_V2:
        out = _width(c * width)
        for i in range(n):
            layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
            channels = out
    layers.append(_conv_bn(channels, last, 1, 1))
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(last, classes),
    )


# --- ResNet-50 (He et al. 2016) ---------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), plus the shortcut (projected when shapes differ)."""

    def __init__(self, inp: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.block = nn.Sequential(
            nn.Conv2d(inp, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.shortcut = (
            nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or inp != out
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.block(x) + self.shortcut(x))


def resnet50(classes: int = 1000, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    channels = 64
    for stage, repeats in enumerate(blocks):
        width = 64 * 2**stage
        for i in range(repeats):
            layers.append(Bottleneck(channels, width, 2 if stage > 0 and i == 0 else 1))
            channels = width * 4
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers, *head)


# --- Making random weights behave like trained ones --------------------------------------------


def photo_tensors(seeds: range, spec: PreprocessSpec = IMAGENET_SPEC) -> np.ndarray:
    """Generated 640x480 JPEGs through the service's own decode and preprocess."""
    limits, hint = DecodeLimits(), spec.decode_size_hint
    images = (decode_image(photo_jpeg(PHOTO_640, s), limits, None, hint) for s in seeds)
    return np.stack([preprocess(image, spec) for image in images])


RESIDUAL_GAIN = 0.2  # residual branches start small, as in trained ResNets ("zero-init" gamma)


def initialise(module: nn.Module, photos: np.ndarray, seed: int = SEED) -> nn.Module:
    """Weights that behave like a trained net's, from a seed and `photos`; eval mode.

    Measured here: He-initialised convs with data-centred BatchNorm are chaotic (a random BN net
    amplifies any perturbation layer after layer), so INT8 rounding changed the features by 84%
    of their spread. Trained nets are not like that. Delta-orthogonal convs (Xiao et al. 2018),
    BatchNorm that scales without centring, and small residual branches keep the net ordered:
    INT8 then changes the features by ~8% of their spread, like a trained net.
    """
    torch.manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            _delta_orthogonal(layer)
        elif isinstance(layer, nn.BatchNorm2d):
            layer.reset_parameters()
            layer.momentum = None  # running stats become the plain average over `photos`
    for layer in module.modules():
        if isinstance(layer, InvertedResidual | Bottleneck) and _has_identity_skip(layer):
            last_bn = [m for m in layer.block.modules() if isinstance(m, nn.BatchNorm2d)][-1]
            nn.init.constant_(last_bn.weight, RESIDUAL_GAIN)
    with torch.no_grad():
        module.train()(torch.from_numpy(photos))
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):  # scale by the second moment, do not centre
                layer.running_var.add_(layer.running_mean**2)
                layer.running_mean.zero_()
        features = module.eval()[:-1](torch.from_numpy(photos))  # the classifier's input
        weight, bias = grid_head(features.double().numpy())
        module[-1].weight.copy_(torch.from_numpy(weight))
        module[-1].bias.copy_(torch.from_numpy(bias))
    return module


def _delta_orthogonal(conv: nn.Conv2d) -> None:
    """Full convs: an orthogonal matrix on the centre tap; depthwise: a positive blur."""
    weight = conv.weight.data
    out, inp, kh, kw = weight.shape
    if conv.groups == 1:
        centre = torch.empty(out, inp)
        nn.init.orthogonal_(centre)
        weight.zero_()
        weight[:, :, kh // 2, kw // 2] = centre
    else:
        weight.uniform_(0, 1)
        weight.div_(weight.sum(dim=(1, 2, 3), keepdim=True))


def _has_identity_skip(block: nn.Module) -> bool:
    if isinstance(block, InvertedResidual):
        return block.skip
    return isinstance(block.shortcut, nn.Identity)


AXES = 2  # principal axes the classifier reads
SHARPNESS = 8.0


def grid_head(features: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """A linear classifier whose top-1 is the nearest centre in the space of the features' main
    principal axes (whitened scores z): logit_k = s * (2 c_k.z - |c_k|^2), z = A (f - mean).

    Random logits make top-1 a near-tie among 1000 classes, so any rounding flips it; a trained
    net's top-1 has a margin. Measured on INT8 (see docs/benchmarks.md): 2 cells on each of 2
    axes keep >= 99% agreement, finer grids do not (10x10x10: 80%). So four classes win, one per
    quadrant; the other 996 sit far outside the data (they exist for the head's real size).
    """
    mean = features.mean(axis=0)
    _, singular, axes = np.linalg.svd(features - mean, full_matrices=False)
    project = axes[:AXES] / (singular[:AXES, None] / np.sqrt(len(features) - 1))
    half = np.sqrt(2) * _erfinv(0.5)  # +-0.674: the quartiles, equally likely cells
    winners = np.array(np.meshgrid(*[[-half, half]] * AXES, indexing="ij")).reshape(AXES, -1).T
    rng = np.random.default_rng(seed)
    far = rng.normal(size=(len(LABELS) - len(winners), AXES))
    far *= rng.uniform(8, 12, size=(len(far), 1)) / np.linalg.norm(far, axis=1, keepdims=True)
    centres = np.concatenate([winners, far])
    weight = SHARPNESS * 2 * centres @ project
    bias = SHARPNESS * (-2 * centres @ project @ mean - (centres**2).sum(axis=1))
    return weight.astype(np.float32), bias.astype(np.float32)


def _erfinv(y: float) -> float:
    return float(torch.erfinv(torch.tensor(y, dtype=torch.float64)))


# --- Export and save ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkModel:
    tag: str
    arch: str
    build: Callable[[], nn.Module]


MOBILENET = BenchmarkModel("mobilenetv2-bench:v1", "MobileNetV2-class (width 1.0)", mobilenet_v2)
RESNET = BenchmarkModel("resnet50-bench:v1", "ResNet-50-class (bottlenecks 3-4-6-3)", resnet50)
BENCHMARK_MODELS = (MOBILENET, RESNET)


def build_and_save(
    model: BenchmarkModel, force: bool = False, say: Callable[[str], None] = print
) -> str:
    """Initialise, export with the project's exporter, check ORT against torch, save with a card."""
    if already_saved(model.tag, force, say):
        return model.tag
    torch.set_num_threads(2)
    module = initialise(model.build(), photo_tensors(STATS_SEEDS))
    checks = photo_tensors(CHECK_SEEDS)
    saved, difference = export_and_save(
        module,
        checks,
        model.tag,
        name=model.tag.split(":")[0],
        labels=LABELS,
        preprocessing=IMAGENET_SPEC,
        benchmark_only=True,
        description=DESCRIPTION.format(arch=model.arch),
    )
    say(f"saved {saved} (benchmark only): ONNX Runtime matches torch on {len(checks)} photos, "
        f"max probability difference {difference:.1e}")  # fmt: skip
    return saved
