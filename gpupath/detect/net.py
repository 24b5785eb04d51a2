"""The shipped nuclei network (torch): a compact centre-heatmap detector, its weights and ONNX export.

Architecture (``nuclei_v1``, about 80 k parameters): six 3 x 3 convolutions with ReLU, two of
them stride 2 and one dilated, give a 4-px output grid with a ~45-px receptive field (22 µm at
0.5 µm/px: a nucleus and its surroundings); three 1 x 1 heads give per cell

- ``heatmap`` (N, 1, H/4, W/4): sigmoid score that a nucleus centre lies in the cell,
- ``size`` (N, 1, H/4, W/4): nucleus radius in input px (``8 * exp(raw)``),
- ``offset`` (N, 2, H/4, W/4): centre (x, y) within the cell in [0, 1] (sigmoid), so the
  centre is ``(cell + offset) * 4`` input px (CenterNet, Zhou et al. 2019, "Objects as Points").

No batch normalisation: the exported ONNX graph and this module are the same operations, so
the torch engine and ONNX Runtime / TensorRT run one set of weights. Weights ship as ``.npz``
(no pickle) beside the ONNX file; ``torch`` is imported by this module, so import it lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["NucleiNet", "STRIDE_PX", "load_weights", "save_weights", "export_onnx"]

STRIDE_PX = 4
RADIUS_SCALE_PX = 8.0
# (in, out, stride, dilation) of the trunk's 3 x 3 convolutions
_TRUNK = ((3, 16, 1, 1), (16, 32, 2, 1), (32, 32, 1, 1), (32, 48, 2, 1), (48, 48, 1, 1), (48, 48, 1, 2))
_HEAD_CH = 32


class NucleiNet(nn.Module):
    """Centre-heatmap nuclei detector; input (N, 3, H, W) float, H and W multiples of 4."""

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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heat, size, offset = self.forward_logits(x)
        return (torch.sigmoid(heat), RADIUS_SCALE_PX * torch.exp(torch.clamp(size, -3.0, 3.0)),
                torch.sigmoid(offset))


def save_weights(net: NucleiNet, path: str | Path) -> None:
    """Write the state dict as float32 ``.npz`` (no pickle)."""
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_weights(path: str | Path) -> NucleiNet:
    """A :class:`NucleiNet` in eval mode with the weights of ``path`` (``.npz``)."""
    net = NucleiNet()
    with np.load(path, allow_pickle=False) as data:
        state = {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in data.files}
    missing = set(net.state_dict()) ^ set(state)
    if missing:
        raise ValueError(f"{path}: weights do not match NucleiNet (differing keys: {sorted(missing)[:4]})")
    net.load_state_dict(state)
    return net.eval()


def export_onnx(net: NucleiNet, path: str | Path, *, input_name: str = "tiles", opset: int = 17) -> None:
    """Export with a dynamic batch, height and width (the TorchScript exporter: a plain conv graph)."""
    import warnings  # noqa: PLC0415

    net = net.eval()
    example = torch.zeros(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is the deterministic one here
        torch.onnx.export(
            net, (example,), str(path), input_names=[input_name], output_names=["heatmap", "size", "offset"],
            dynamic_axes={input_name: {0: "batch", 2: "height", 3: "width"},
                          **{o: {0: "batch", 2: "grid_h", 3: "grid_w"} for o in ("heatmap", "size", "offset")}},
            opset_version=opset, dynamo=False,
        )
