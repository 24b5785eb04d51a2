"""The model card of a trained nuclei_v2: what it takes, what it gives, what it learned from, how it scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpupath.train._loop import MEAN, STD, TrainSettings
from gpupath.train._tune import PEAK_WINDOW_PX, STRIDE_PX

NAME = "nuclei_v2"
HEADER = ("# gpupath model card: the shipped nuclei detector. Written by `python -m gpupath.train`;\n"
          "# the metrics by `gpupath evaluate` (see README). Do not edit the sha256 lines by hand.\n")

DATA_LICENCES = {
    "brca_m2c": ("BRCA-M2C (Abousamra et al., ICCV 2021; TCGA-BRCA crops), BSD-3-Clause: "
                 "Copyright (c) 2022, TopoXLab. All rights reserved. Redistribution of the weights keeps this notice, "
                 "the licence's conditions and its disclaimer (licenses/BRCA-M2C-LICENSE.txt beside this card); "
                 "no endorsement by TopoXLab."),
    "consep": ("CoNSeP (Graham et al., HoVer-Net, Medical Image Analysis 58:101563, 2019), Tissue Image Analytics "
               "Centre, University of Warwick, Apache-2.0 (licenses/CoNSeP-LICENSE-Apache-2.0.txt); used in the "
               "20x centroid form made by TopoXLab/MCSpatNet (MIT, Copyright (c) 2021 TopoXLab, "
               "licenses/MCSpatNet-LICENSE-MIT.txt). NOTICE: images downscaled by 2 and centroid dot maps by "
               "MCSpatNet (commit ef3c87a), converted to PNG + CSV with dots shifted +0.25 px "
               "(licenses/CoNSeP-NOTICE.txt)."),
}


def data_licence(name: str, meta: dict[str, Any]) -> str:
    """The licence text the card carries for one training dataset: ours for the shipped sets, else the
    dataset's own ``meta.json`` ``licence`` (a lab's data), else a plain "not stated"."""
    if name in DATA_LICENCES:
        return DATA_LICENCES[name]
    return str(meta.get("licence") or meta.get("license") or f"not stated in {name}/meta.json")


def card_dict(*, net: Any, classes: tuple[str, ...], threshold: float, settings: TrainSettings, command: str,
              wall_s: float, data: dict[str, Any], data_meta: dict[str, dict[str, Any]], metrics: dict[str, Any],
              onnx_sha: str, npz_sha: str, dedup_um: float) -> dict[str, Any]:
    """The card as a mapping (YAML key order as written); ``data_meta``: each dataset's meta.json."""
    params = sum(p.numel() for p in net.parameters())
    return {
        "format": "gpupath-model-card/1",
        "name": NAME,
        "version": 2,
        "description": (
            f"Nuclei and their class in H&E tiles at 0.5 µm/px (20x). Encoder-decoder CNN ({params} parameters, "
            "batch norm folded into the convolutions): an 8-px stage with dilated convolutions (receptive field "
            "~180 px = 90 µm) joined back at 4 px; the head predicts each 4-px cell's 2 x 2 sub-cells "
            "(depth-to-space), so the centre heatmap (any nucleus), radius and in-cell offset come on a 2-px grid "
            "(nuclei 3 µm apart stay two peaks) and the class probabilities on the same grid (CenterNet-style). "
            "A detection's label is the most probable class at its peak; its box is the circle's bounding square."),
        "license": "Apache-2.0 (code and weights); training data under their own licences, see training.data_licences",
        "model": f"{NAME}.onnx",
        "sha256": onnx_sha,
        "weights": f"{NAME}.npz",
        "weights_sha256": npz_sha,
        "classes": list(classes),
        "dedup_distance_um": dedup_um,
        "input": {"name": "tiles", "layout": "NCHW", "channels": "RGB", "dtype": "float32", "mpp": 0.5,
                  "size_px": None, "multiple_of": 8, "scale": 255.0, "mean": list(MEAN), "std": list(STD)},
        "output": {"decoder": "heatmap", "heatmap": "heatmap", "class_probs": "classes", "size": "size",
                   "size_kind": "radius", "offset": "offset", "stride_px": STRIDE_PX,
                   "peak_window_px": PEAK_WINDOW_PX, "threshold": float(threshold)},
        "training": {
            "command": command,
            "wall_time_s": round(wall_s),
            "machine": "2 CPU cores, torch 2.13.0 CPU",
            "steps": settings.steps, "batch": settings.batch, "crop_px": settings.crop_px, "lr": settings.lr,
            "seed": settings.seed, "synthetic_weight": settings.synthetic_weight,
            **data,
            "data_licences": {name: data_licence(name, meta) for name, meta in data_meta.items()},
            "augmentation": ("each crop: one of the three --stain renderings (none, Macenko to gpupath.stain.REFERENCE, "
                             "Vahadane to gpupath.vahadane.VAHADANE_REFERENCE; fitted per image / per generated slide), "
                             "scale x0.9-1.1, windows up to 24 px past the image edge (white, as the reader pads), "
                             "90-degree rotations and flips, HED jitter (x0.9-1.1, +-0.03 OD per stain), Gaussian blur "
                             "(25 %, sigma 0.4-1.2 px), JPEG re-encoding (33 %, quality 50-95)"),
            "loss": ("CenterNet penalty-reduced focal loss (alpha 2, beta 4) on the centre heatmap + cross-entropy "
                     "of the class map at labelled centres + L1 radius / 8 + L1 offset"),
            "size_targets": ("radius at each human point: the scale of the strongest scale-normalised LoG response of "
                             "the hematoxylin channel there (r = s * sqrt(2)), clipped to 1-4.5 µm; on generated "
                             "slides the generator's radius"),
        },
        "metrics": metrics,
    }


def generated_slide_metrics(card_path: Path, work: Path) -> dict[str, Any]:
    """Recall and precision of the full pipeline (tissue, 256-px tiles, 32-px overlap, Macenko) with this
    card on the generated evaluation slides (seeds never trained on), centres within 4 level-0 px."""
    from gpupath.train._synthetic import EVAL_SEEDS, MATCH_PX, evaluate_synthetic

    rows = evaluate_synthetic(card_path, work, EVAL_SEEDS)
    return {"generated_match": (f"one-to-one, centres within {MATCH_PX:g} level-0 px, full pipeline (tissue, 256-px "
                                "tiles, 32-px overlap, Macenko)"),
            "generated_slides_not_trained_on": [
                {"seed": seed, "recall": round(r, 3), "precision": round(p, 3), "nuclei": n} for seed, r, p, n in rows]}


def write_card(path: Path, card: dict[str, Any]) -> Path:
    """Write the card YAML atomically."""
    import yaml

    from gpupath.files import atomic_path

    text = HEADER + yaml.safe_dump(card, sort_keys=False, allow_unicode=True, width=110)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
