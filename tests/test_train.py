"""Training nuclei_v2: the LoG size rule, batch-norm folding, export, a few real steps, the command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the train extra (torch)")

from conftest import nuclei_dataset  # noqa: E402

from gpupath import stain  # noqa: E402
from gpupath.detect.annotations import read_dataset  # noqa: E402
from gpupath.detect.net import NucleiNetV2, export_onnx, fuse_batch_norm, load_weights, save_weights  # noqa: E402


def hematoxylin_disc(radius_px: float, centre=(40.5, 30.5), shape=(64, 80)) -> np.ndarray:
    """RGB of a disc of the reference hematoxylin (OD 0.8) on faint eosin."""
    rr, cc = np.mgrid[: shape[0], : shape[1]] + 0.5
    inside = np.hypot(cc - centre[0], rr - centre[1]) <= radius_px
    h_od, e_od = stain.REFERENCE.stain_matrix_od[:, 0], stain.REFERENCE.stain_matrix_od[:, 1]
    od = inside[..., None] * 0.8 * h_od + 0.1 * e_od
    return np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("radius_px", [3.0, 5.0, 7.0])
def test_log_size_rule_recovers_a_disc_radius(radius_px: float) -> None:
    from gpupath.train._data import log_radii

    got = log_radii(hematoxylin_disc(radius_px), np.array([40.5]), np.array([30.5]))
    assert got[0] == pytest.approx(radius_px, rel=0.2)  # the scale grid steps by 15 %


def test_folded_batch_norm_is_the_same_function() -> None:
    torch.manual_seed(0)
    net = NucleiNetV2(3, norm=True)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.randn(2, 3, 64, 48)
    fused = fuse_batch_norm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    for a, b in zip(net(x), fused(x), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_weights_and_onnx_give_the_torch_outputs(tmp_path) -> None:
    import onnxruntime as ort

    torch.manual_seed(1)
    net = fuse_batch_norm(NucleiNetV2(3, norm=True).eval())
    save_weights(net, tmp_path / "w.npz")
    export_onnx(net, tmp_path / "m.onnx")
    again = load_weights(tmp_path / "w.npz")
    assert type(again) is NucleiNetV2 and again.n_classes == 3
    x = torch.randn(2, 3, 96, 64)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"tiles": x.numpy()}), strict=True))
    for name, ref in zip(NucleiNetV2.output_names, again(x), strict=True):
        np.testing.assert_allclose(got[name], ref.detach().numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="fuse_batch_norm"):
        save_weights(NucleiNetV2(3, norm=True), tmp_path / "bn.npz")


def test_a_few_steps_on_two_real_images_lower_the_loss() -> None:
    from gpupath.train._data import annotated_train_image
    from gpupath.train._loop import TrainSettings, train

    images = [annotated_train_image(im) for im in read_dataset(nuclei_dataset("consep"), split="train")[:2]]
    net, history = train(images, n_classes=3, settings=TrainSettings(steps=60, batch=4, crop_px=64, lr=3e-3,
                                                                     log_every=10))
    losses = [v for _, v in history]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses  # step 0 vs the mean of the last ten steps
    assert type(net) is NucleiNetV2 and not net.training


def test_the_training_command_writes_a_model_the_pipeline_loads(tmp_path) -> None:
    from gpupath.detect.card import load_card
    from gpupath.detect.detector import make_detector
    from gpupath.train import main

    # a lab's own dataset in the same format: three CoNSeP training images copied into a new folder
    src, mine = nuclei_dataset("consep"), tmp_path / "my_set"
    names = json.loads((src.parent / "splits.json").read_text())["consep"]["train"][:3]
    for sub, ext in (("images", "png"), ("centroids", "csv")):
        (mine / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(src / sub / f"{name}.{ext}", mine / sub)
    shutil.copy(src / "meta.json", mine)
    rc = main(["--work", str(tmp_path), "--data", str(mine), "--synthetic-slides", "0", "--no-generated-eval",
               "--steps", "3", "--batch", "2", "--crop", "64", "--tune-fraction", "0.5"])
    assert rc == 0
    out = tmp_path / "model"
    card = load_card(out / "nuclei_v2.yaml")
    assert card.classes == ("inflammatory", "epithelial", "stromal")
    assert card.extra["training"]["datasets"]["my_set"]["images"] == 3
    # the lab's own set carries the licence of its meta.json; no shipped-set licence files are copied
    assert card.extra["training"]["data_licences"] == {"my_set": json.loads((src / "meta.json").read_text())["licence"]}
    assert not (out / "licenses").exists()
    assert card.extra["metrics"]["tune_f1_by_threshold"]  # chosen on held-out training images
    det, _ = make_detector("onnxruntime", model_card=out / "nuclei_v2.yaml")
    tiles = np.full((2, 64, 64, 3), 230, np.uint8)
    found = det.detect(tiles, tile_mpp=0.5, stain_matrix_od=np.eye(3)[:, :2])
    assert ((found.label >= 0) & (found.label < 3)).all()
