"""The shipped nuclei networks (torch): centre-heatmap detectors, their weights and ONNX export.

``nuclei_v2`` (:class:`NucleiNetV2`, the default detector, about 0.38 M parameters): a small
encoder-decoder on a 4-px output grid. The encoder goes to 8 px (three stride-2 3 x 3
convolutions) and widens its view there with dilated convolutions (receptive field ~180 px =
90 µm at 0.5 µm/px: a nucleus, its neighbours and the tissue around them, which is what tells a
lymphocyte from a tumour cell); the decoder upsamples once and joins the 4-px features. Heads
(1 x 1) give per 4-px cell

- ``heatmap`` (N, 1, H/4, W/4): sigmoid score that a nucleus centre lies in the cell,
- ``classes`` (N, C, H/4, W/4): softmax class probabilities of that nucleus,
- ``size`` (N, 1, H/4, W/4): nucleus radius in input px (``8 * exp(raw)``),
- ``offset`` (N, 2, H/4, W/4): centre (x, y) within the cell in [0, 1] (sigmoid), so the
  centre is ``(cell + offset) * 4`` input px (CenterNet, Zhou et al. 2019, "Objects as Points").

It trains with batch normalisation, which :func:`fuse_batch_norm` folds into the convolutions
before export: the ``.npz`` weights, the torch engine and the ONNX graph are one set of plain
convolutions. ``nuclei_v1`` (:class:`NucleiNet`, 84 k parameters, one class, 45-px view) is the
earlier model, kept loadable for comparisons (``gpupath evaluate`` measures it beside v2).

Weights ship as ``.npz`` (no pickle) with an ``architecture`` entry naming the class;
``torch`` is imported by this module, so import it lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["NucleiNet", "NucleiNetV2", "ARCHITECTURES", "STRIDE_PX", "V2_STRIDE_PX", "RADIUS_SCALE_PX", "load_weights",
           "save_weights", "export_onnx", "fuse_batch_norm"]

STRIDE_PX = 4       # nuclei_v1's output grid, input px per cell
V2_STRIDE_PX = 2    # nuclei_v2's: 1 µm cells at 0.5 µm/px, so touching nuclei (centres ~3 µm apart) stay two peaks
RADIUS_SCALE_PX = 8.0
# (in, out, stride, dilation) of v1's 3 x 3 convolutions
_TRUNK = ((3, 16, 1, 1), (16, 32, 2, 1), (32, 32, 1, 1), (32, 48, 2, 1), (48, 48, 1, 1), (48, 48, 1, 2))
_HEAD_CH = 32


def _outputs(heat: torch.Tensor, size: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (torch.sigmoid(heat), RADIUS_SCALE_PX * torch.exp(torch.clamp(size, -3.0, 3.0)), torch.sigmoid(offset))


class NucleiNet(nn.Module):
    """nuclei_v1: one-class centre-heatmap detector; input (N, 3, H, W) float, H and W multiples of 4."""

    architecture = "nuclei_v1"
    output_names = ("heatmap", "size", "offset")

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, stride=s, padding=d, dilation=d) for cin, cout, s, d in _TRUNK)
        self.neck = nn.Conv2d(_TRUNK[-1][1], _HEAD_CH, 3, padding=1)
        self.heat = nn.Conv2d(_HEAD_CH, 1, 1)
        self.size = nn.Conv2d(_HEAD_CH, 1, 1)
        self.offset = nn.Conv2d(_HEAD_CH, 2, 1)
        nn.init.constant_(self.heat.bias, -4.0)  # start near "no nucleus" (focal-loss practice)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for conv in self.trunk:
            x = torch.relu(conv(x))
        x = torch.relu(self.neck(x))
        return self.heat(x), self.size(x), self.offset(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _outputs(*self.forward_logits(x))


class _ConvUnit(nn.Module):
    """3 x 3 (or 1 x 1) convolution, optional batch norm (training only), ReLU."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1, kernel: int = 3,
                 norm: bool) -> None:
        super().__init__()
        pad = dilation * (kernel // 2)
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return torch.relu(self.bn(x) if self.bn is not None else x)


# v2 widths: 2-px, 4-px, 8-px stages and the decoder
_V2_CH = (24, 32, 48, 96, 64)
_SUB = STRIDE_PX // V2_STRIDE_PX   # sub-cells per 4-px cell side


class NucleiNetV2(nn.Module):
    """nuclei_v2: centre heatmap + class map + radius + offset on a 2-px grid; input (N, 3, H, W), H and W
    multiples of 8.

    Encoder to stride 8 (dilated convolutions for context), joined back at stride 4; the head predicts
    each 4-px cell's 2 x 2 sub-cells (heatmap, radius, offset: 16 channels, rearranged by depth-to-space
    onto the 2-px output grid) and the class logits (upsampled to that grid). On the 2-px grid nuclei
    whose centres are 3 µm apart stay two peaks under a 3-cell peak window, at the cost of a 4-px one.

    Parameters
    ----------
    n_classes : number of nucleus classes of the class map.
    norm : batch normalisation after each convolution (training); :func:`fuse_batch_norm` gives
        the ``norm=False`` network with the same function for export and inference.
    """

    architecture = "nuclei_v2"
    output_names = ("heatmap", "classes", "size", "offset")
    stride_px = V2_STRIDE_PX

    def __init__(self, n_classes: int = 3, *, norm: bool = False) -> None:
        super().__init__()
        c2, c4, c8a, c8, dec = _V2_CH
        self.n_classes = n_classes
        self.stem = nn.Sequential(_ConvUnit(3, c2, stride=2, norm=norm), _ConvUnit(c2, c4, norm=norm))
        self.down4 = nn.Sequential(_ConvUnit(c4, c8a, stride=2, norm=norm), _ConvUnit(c8a, c8a, norm=norm))
        self.down8 = nn.Sequential(_ConvUnit(c8a, c8, stride=2, norm=norm), _ConvUnit(c8, c8, norm=norm),
                                   _ConvUnit(c8, c8, dilation=2, norm=norm), _ConvUnit(c8, c8, dilation=4, norm=norm))
        self.join = _ConvUnit(c8a + c8, dec, kernel=1, norm=norm)
        self.fuse = _ConvUnit(dec, dec, norm=norm)
        self.classes = nn.Conv2d(dec, n_classes, 1)
        self.head = nn.Conv2d(dec, 4 * _SUB ** 2, 1)   # (heat, radius, offset x, offset y) per sub-cell
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[: _SUB ** 2] = -4.0  # start near "no nucleus" (focal-loss practice)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        f4 = self.down4(self.stem(x))
        f8 = self.down8(f4)
        d4 = self.fuse(self.join(torch.cat([f4, nn.functional.interpolate(f8, scale_factor=2.0, mode="nearest")], 1)))
        out = nn.functional.pixel_shuffle(self.head(d4), _SUB)
        cls = nn.functional.interpolate(self.classes(d4), scale_factor=float(_SUB), mode="nearest")
        return out[:, :1], cls, out[:, 1:2], out[:, 2:4]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        heat, cls, size, offset = self.forward_logits(x)
        heat, size, offset = _outputs(heat, size, offset)
        return heat, torch.softmax(cls, 1), size, offset


ARCHITECTURES: dict[str, type[nn.Module]] = {"nuclei_v1": NucleiNet, "nuclei_v2": NucleiNetV2}


@torch.no_grad()
def fuse_batch_norm(net: NucleiNetV2) -> NucleiNetV2:
    """The same function without batch norm: each BN folded into its convolution (eval statistics).

    ``w' = w * g / sqrt(v + eps)``, ``b' = beta - m * g / sqrt(v + eps)`` per output channel.
    """
    fused = NucleiNetV2(net.n_classes, norm=False)
    src = dict(net.named_modules())
    for name, unit in fused.named_modules():
        if not isinstance(unit, _ConvUnit):
            continue
        trained = src[name]
        w, bn = trained.conv.weight, trained.bn
        if bn is None:
            unit.conv.weight.copy_(w)
            unit.conv.bias.copy_(trained.conv.bias)
            continue
        g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        unit.conv.weight.copy_(w * g[:, None, None, None])
        unit.conv.bias.copy_(bn.bias - bn.running_mean * g)
    fused.head.load_state_dict(net.head.state_dict())
    fused.classes.load_state_dict(net.classes.state_dict())
    return fused.eval()


def save_weights(net: nn.Module, path: str | Path) -> None:
    """Write the state dict as float32 ``.npz`` (no pickle) with the architecture's name."""
    if getattr(net, "n_classes", None) is not None and any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
        raise ValueError("fuse_batch_norm() the network before saving it (the engines run plain convolutions)")
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    arrays["architecture"] = np.array(net.architecture)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_weights(path: str | Path) -> nn.Module:
    """The network of ``path`` (``.npz``: its ``architecture`` entry, v1 when absent) in eval mode."""
    with np.load(path, allow_pickle=False) as data:
        arch = str(data["architecture"]) if "architecture" in data.files else "nuclei_v1"
        state = {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in data.files if k != "architecture"}
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    if arch == "nuclei_v2":
        net: nn.Module = NucleiNetV2(int(state["classes.weight"].shape[0]))
    else:
        net = NucleiNet()
    differing = set(net.state_dict()) ^ set(state)
    if differing:
        raise ValueError(f"{path}: weights do not match {arch} (differing keys: {sorted(differing)[:4]})")
    net.load_state_dict(state)
    return net.eval()


def export_onnx(net: nn.Module, path: str | Path, *, input_name: str = "tiles", opset: int = 17) -> None:
    """Export with a dynamic batch, height and width (the TorchScript exporter: a plain conv graph)."""
    import warnings

    net = net.eval()
    example = torch.zeros(1, 3, 64, 64)
    names = list(net.output_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is the deterministic one here
        torch.onnx.export(
            net, (example,), str(path), input_names=[input_name], output_names=names,
            dynamic_axes={input_name: {0: "batch", 2: "height", 3: "width"},
                          **{o: {0: "batch", 2: "grid_h", 3: "grid_w"} for o in names}},
            opset_version=opset, dynamo=False,
        )
