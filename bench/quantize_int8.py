"""Static int8 quantisation of the shipped nuclei model for ONNX Runtime on the CPU (issue 17 study).

    python bench/quantize_int8.py --out /tmp/int8          # -> nuclei_v2_int8.onnx + .yaml card
    gpupath evaluate DATA/brca_m2c DATA/consep --model-card /tmp/int8/nuclei_v2_int8.yaml --engine onnxruntime

Calibration: 256-px crops of the first 12 *training* images of each dataset in
../shared/data/nuclei-train (never the validation split), preprocessed as the pipeline does; QDQ
format, uint8 activations, per-channel int8 weights. The card is the shipped one with the int8
file and its sha256.

The class map's final Softmax is left out of the int8 graph (its output keeps the name and shape,
as logits): the heatmap decoder reads only the argmax of the class map, which the Softmax does not
change, and its quantised form was 9 % of the int8 model's CPU time (ONNX Runtime profile, one
thread). Validation F1 of the result against fp32: in the card.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import yaml

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuclei-train"


def calibration_tiles(per_dataset: int = 12) -> np.ndarray:
    from gpupath.detect.annotations import read_dataset, read_image

    tiles = []
    for name in ("brca_m2c", "consep"):
        for image in list(read_dataset(DATA / name, split="train"))[:per_dataset]:
            rgb = read_image(image)
            tiles += [rgb[y:y + 256, x:x + 256] for y in (0, 200) for x in (0, 200)
                      if rgb[y:y + 256, x:x + 256].shape[:2] == (256, 256)]
    return np.stack(tiles)


def without_class_softmax(src: Path, dst: Path, class_output: str | None) -> None:
    """``src`` with the Softmax that makes ``class_output`` removed: its input becomes the output (logits)."""
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    softmax = [n for n in graph.node if n.op_type == "Softmax" and class_output in n.output]
    if len(softmax) != 1:
        raise SystemExit(f"{src}: expected one Softmax making {class_output!r}, found {len(softmax)}")
    (node,) = softmax
    logits = node.input[0]
    graph.node.remove(node)
    for n in graph.node:  # whatever made the logits now makes the output
        n.output[:] = [class_output if o == logits else o for o in n.output]
        n.input[:] = [class_output if i == logits else i for i in n.input]
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out = args.out.resolve()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from gpupath.detect.card import file_sha256, shipped_card
    from gpupath.detect.preprocess import preprocess

    card = shipped_card()
    args.out.mkdir(parents=True, exist_ok=True)
    tiles = calibration_tiles()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({card.input.name: preprocess(tiles[i:i + 8], card.input)}
                                for i in range(0, len(tiles), 8))

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    bare, pre, model = args.out / "bare.onnx", args.out / "pre.onnx", args.out / "nuclei_v2_int8.onnx"
    without_class_softmax(card.model_path, bare, card.output.class_probs)
    with contextlib.chdir(args.out):  # both write scratch files into the working folder
        quant_pre_process(str(bare), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(model), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    pre.unlink()
    bare.unlink()
    raw = yaml.safe_load(card.card_path.read_text(encoding="utf-8"))
    raw.update(name="nuclei_v2_int8", model=model.name, sha256=file_sha256(model))
    for key in ("weights", "weights_sha256", "int8_model", "int8_sha256"):  # the int8 card runs its own file
        raw.pop(key, None)
    (args.out / "nuclei_v2_int8.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    print(f"wrote {model} ({len(tiles)} calibration tiles) and its card")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
