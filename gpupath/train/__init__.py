"""Train the shipped nuclei detector (``nuclei_v2``) on the CPU from human-annotated datasets and export it.

    python -m gpupath.train --work /tmp/nuclei-train                  # -> /tmp/nuclei-train/model/
    python -m gpupath.train --work W --data ../shared/data/nuclei-train/brca_m2c --data my_lab_set/

Needs the ``train`` extra (torch, onnx). ``--data`` takes any dataset folder of the annotation
format (:mod:`gpupath.detect.annotations`: images + ``x,y,class`` CSVs + meta.json with mpp, and
its ``splits.json``); only its ``train`` split is read. ``--class-map`` maps the datasets' classes
to the model's (default: ``gpupath/detect/models/class_map.yaml``). Generated slides
(:mod:`gpupath.synthetic`, exact nuclei and radii, no classes) are an auxiliary source
(``--synthetic-slides``, 0 for none). A tenth of the training images (by name hash) is held out of
the loss to choose the heatmap threshold; the validation split is never read by training.

Writes ``nuclei_v2.npz`` (weights), ``nuclei_v2.onnx``, ``nuclei_v2.yaml`` (card) and
``licenses/`` to ``--out`` (default ``WORK/model``). Then ``gpupath evaluate`` measures it
(``--card-metrics`` writes those figures into the card).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("gpupath.train")

from gpupath.train._synthetic import EVAL_SEEDS, evaluate_synthetic, read_slide_tiles  # noqa: E402

__all__ = ["main", "EVAL_SEEDS", "evaluate_synthetic", "read_slide_tiles", "DEFAULT_DATA"]

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "nuclei-train"
DEFAULT_DATA = (DEFAULT_DATA_ROOT / "brca_m2c", DEFAULT_DATA_ROOT / "consep")
_LICENCE_FILES = {"brca_m2c/LICENSE.txt": "BRCA-M2C-LICENSE.txt",
                  "consep/LICENSE-Apache-2.0.txt": "CoNSeP-LICENSE-Apache-2.0.txt",
                  "consep/LICENSE-MIT-MCSpatNet.txt": "MCSpatNet-LICENSE-MIT.txt",
                  "consep/NOTICE.txt": "CoNSeP-NOTICE.txt"}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gpupath.train", description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for generated slides (reused) and the model")
    ap.add_argument("--out", type=Path, default=None, help="where the model files go (default WORK/model)")
    ap.add_argument("--data", type=Path, action="append", default=None,
                    help="an annotation dataset folder (repeat; default BRCA-M2C and CoNSeP in ../shared)")
    ap.add_argument("--class-map", type=Path, default=None, help="class map YAML (default: the shipped one)")
    ap.add_argument("--synthetic-slides", type=int, default=8, help="generated slides as an auxiliary source")
    ap.add_argument("--steps", type=int, default=12_000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=160, help="training crop, px (multiple of 8)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-generated-eval", action="store_true",
                    help="skip scoring the model on the generated evaluation slides (the card's "
                         "generated_slides_not_trained_on; for quick trial runs)")
    ap.add_argument("--tune-fraction", type=float, default=0.1,
                    help="share of training images held out to choose the threshold")
    return ap


def _images(args: argparse.Namespace, class_map):  # noqa: ANN001, ANN202
    from gpupath.detect.annotations import read_dataset
    from gpupath.train._data import annotated_train_image, synthetic_train_images
    from gpupath.train._synthetic import TRAIN_SEEDS
    from gpupath.train._tune import is_tune_image

    train, tune, counts = [], [], {}
    for folder in args.data:
        ann = read_dataset(folder, split="train", class_map=class_map)
        for image in ann:
            (tune if is_tune_image(image.name, args.tune_fraction) else train).append(annotated_train_image(image))
        counts[folder.name] = {"images": len(ann), "nuclei": int(sum(len(a) for a in ann))}
        log.info("%s: %d training images", folder.name, len(ann))
    seeds = tuple(TRAIN_SEEDS[: args.synthetic_slides]) if args.synthetic_slides <= len(TRAIN_SEEDS) else \
        tuple(range(TRAIN_SEEDS[0], TRAIN_SEEDS[0] + args.synthetic_slides))
    synthetic = synthetic_train_images(args.work, seeds) if seeds else []
    return train, tune, synthetic, counts, seeds


# overlap de-duplication distance between centres of one nucleus seen by two tiles (tile-edge
# context moves a centre by up to ~2 µm); it acts across tiles only, so the model's own
# neighbouring peaks (>= 2 µm apart) are never merged
DEDUP_UM = 2.5


def _meta(folder: Path) -> dict:
    """A dataset's meta.json (empty when absent or unreadable: the licence then reads "not stated")."""
    try:
        raw = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.crop % 8 or args.crop < 32:
        raise SystemExit(f"--crop must be a multiple of 8 px and >= 32, got {args.crop}")
    from threadpoolctl import threadpool_limits

    from gpupath.detect.annotations import load_class_map
    from gpupath.detect.card import file_sha256
    from gpupath.detect.net import export_onnx, save_weights
    from gpupath.train._card import NAME, card_dict, generated_slide_metrics, write_card
    from gpupath.train._data import log_radius_fit
    from gpupath.train._loop import TrainSettings, train
    from gpupath.train._tune import choose_threshold

    t0 = time.perf_counter()
    args.data = args.data or list(DEFAULT_DATA)
    args.out = args.out or args.work / "model"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    class_map = load_class_map(args.class_map) if args.class_map else load_class_map()
    settings = TrainSettings(steps=args.steps, batch=args.batch, crop_px=args.crop, lr=args.lr, seed=args.seed)
    with threadpool_limits(limits=1, user_api="blas"):
        images, tune, synthetic, counts, seeds = _images(args, class_map)
        size_fit = log_radius_fit(synthetic[:40]) if synthetic else {}
    log.info("LoG radius rule on generated tiles: %s", size_fit)
    log.info("training on %d images + %d generated tiles; %d tune images", len(images), len(synthetic), len(tune))
    net, history = train(images + synthetic, n_classes=len(class_map.classes), settings=settings)
    save_weights(net, args.out / f"{NAME}.npz")
    export_onnx(net, args.out / f"{NAME}.onnx")
    threshold, by_threshold = choose_threshold(net, tune, len(class_map.classes)) if tune else (0.4, {})
    log.info("threshold %.2f (tune F1 by threshold: %s)", threshold, by_threshold)
    used = {folder.name: folder for folder in args.data}
    for src, dst in _LICENCE_FILES.items():
        name, file_name = src.split("/", 1)
        if name in used and (used[name] / file_name).is_file():
            (args.out / "licenses").mkdir(exist_ok=True)
            shutil.copyfile(used[name] / file_name, args.out / "licenses" / dst)
    data = {"datasets": counts, "class_map": class_map.mapping, "tune_images": len(tune),
            "generated_slides": {"seeds": list(seeds), "tiles": len(synthetic)},
            "log_radius_rule_on_generated_slides": {k: round(v, 3) for k, v in size_fit.items()},
            "loss_history": [[s, round(v, 4)] for s, v in history[:: max(1, len(history) // 20)]]}
    command = "python -m gpupath.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    card = card_dict(net=net, classes=class_map.classes, threshold=threshold, settings=settings, command=command,
                     wall_s=time.perf_counter() - t0, data=data, data_meta={name: _meta(f) for name, f in used.items()},
                     metrics={"tune_f1_by_threshold": {f"{k:.2f}": round(v, 4) for k, v in by_threshold.items()},
                              "validation": "pending: gpupath evaluate ... --card-metrics"},
                     onnx_sha=file_sha256(args.out / f"{NAME}.onnx"), npz_sha=file_sha256(args.out / f"{NAME}.npz"),
                     dedup_um=DEDUP_UM)
    write_card(args.out / f"{NAME}.yaml", card)
    if not args.no_generated_eval:
        card["metrics"].update(generated_slide_metrics(args.out / f"{NAME}.yaml", args.work))
        log.info("generated slides not trained on: %s", card["metrics"]["generated_slides_not_trained_on"])
        write_card(args.out / f"{NAME}.yaml", card)
    log.info("wrote %s in %.0f s", args.out, time.perf_counter() - t0)
    return 0
