"""TIAToolbox 2.1.3 as a peer of the tissue mask and the Macenko fit, on the real CMU-1 scan.

The peer runs in its own venv under .cache/peers/ (pins: pyproject.toml's ``peers-tiatoolbox``),
built by the test (PyPI needed; a failed build skips, naming the step). Its algorithms differ from
ours on purpose, so the tolerances below state how far apart two sound implementations land:

* Macenko: both take the two main eigenvectors of the OD covariance of tissue pixels and the
  1st/99th angular percentiles. TIAToolbox picks tissue by luminosity (< 0.8 in Lab, after a
  2-98 % contrast stretch) and uses OD = -log(I/255); we pick pixels with OD > beta = 0.15 and
  OD = -log((I+1)/io). Measured on 7 tiles: haematoxylin vectors 0.2-2.1 degrees apart,
  eosin 0.2-6.7, mean 2.2.
* Tissue: TIAToolbox's OtsuTissueMasker thresholds grey level; ours thresholds saturation between
  grey-level bounds. Measured: 97.9 % of TIAToolbox's tissue pixels are in ours (ours also keeps
  pale stroma), and at the pipeline's tile level (128 px blocks with >= 5 % tissue) ours selects 187
  tiles, all among TIAToolbox's 189.
"""

from __future__ import annotations

import math
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import data_file
from gpupath import stain
from gpupath.slide import open_slide
from gpupath.tissue import compute_tissue, read_overview
from peer_venv import peer_python as build_peer_python
from stain_helpers import CMU_SMALL, CMU_TILES_XY

_EXTRA = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
    "project"]["optional-dependencies"]["peers-tiatoolbox"]
PEER_SPEC = next(p for p in _EXTRA if p.startswith("tiatoolbox=="))  # installed with --no-deps
# not the bench's TIAToolbox venv (bench/bench_baseline.py: CUDA torch for its patch extractor): a lean one
PEER_DIR = Path(__file__).resolve().parents[1] / ".cache" / "peers" / (PEER_SPEC.replace("==", "-") + "-lean")

# The peer's side. tiatoolbox.tools/__init__ imports the registration module, which needs
# torchvision's CUDA build; the tools package is therefore entered without its __init__ (a plain
# package object on the same folder), so only the modules under comparison are imported and run.
_PEER_SCRIPT = """
import os, sys, types
import numpy as np
import tiatoolbox
tools = types.ModuleType("tiatoolbox.tools")
tools.__path__ = [os.path.join(os.path.dirname(tiatoolbox.__file__), "tools")]
sys.modules["tiatoolbox.tools"] = tools
from tiatoolbox.tools.stainextract import MacenkoExtractor
from tiatoolbox.tools.tissuemask import OtsuTissueMasker
tiles, overview = np.load(sys.argv[1]), np.load(sys.argv[2])
stains = np.stack([MacenkoExtractor().get_stain_matrix(t) for t in tiles])
mask = OtsuTissueMasker().fit_transform([overview])[0]
np.savez(sys.argv[3], stains=stains, mask=np.asarray(mask, bool), version=tiatoolbox.__version__)
"""


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """TIAToolbox's stain matrices of the CMU-1 tiles and its tissue mask of our overview, and ours."""
    import openslide

    python = build_peer_python(PEER_DIR, peer=PEER_SPEC, pins=[p for p in _EXTRA if p != PEER_SPEC],
                               imports="tiatoolbox", no_deps=[PEER_SPEC])
    path = data_file(CMU_SMALL)
    with openslide.OpenSlide(str(path)) as osr:
        tiles = np.stack([np.asarray(osr.read_region(xy, 0, (256, 256)).convert("RGB")) for xy in CMU_TILES_XY])
    with open_slide(path) as slide:
        tissue = compute_tissue(slide)
        overview, _ = read_overview(slide, tissue.downsample)  # the overview our mask was computed on
    work = tmp_path_factory.mktemp("tiatoolbox")
    np.save(work / "tiles.npy", tiles)
    np.save(work / "overview.npy", np.asarray(overview))
    done = subprocess.run([str(python), "-c", _PEER_SCRIPT, str(work / "tiles.npy"), str(work / "overview.npy"),
                           str(work / "peer.npz")], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = np.load(work / "peer.npz")
    assert str(theirs["version"]) == PEER_SPEC.split("==")[1]
    return {"tiles": tiles, "stains": theirs["stains"], "mask": theirs["mask"], "ours_mask": np.asarray(tissue.mask)}


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = abs(float(np.dot(a, b))) / (float(np.linalg.norm(a)) * float(np.linalg.norm(b)))
    return math.degrees(math.acos(min(1.0, cos)))


def test_macenko_stain_vectors_match_tiatoolbox(peer: dict[str, np.ndarray]) -> None:
    angles = []
    for tile, theirs in zip(peer["tiles"], peer["stains"], strict=True):
        ours = stain.fit_macenko(tile).stain_matrix_od.T  # (2, 3): haematoxylin, eosin (as TIAToolbox)
        h, e = _angle_deg(ours[0], theirs[0]), _angle_deg(ours[1], theirs[1])
        assert h <= 3.0 and e <= 8.0, (h, e)
        angles += [h, e]
    assert float(np.mean(angles)) <= 3.0, angles
    # not trivially equal: the tissue selections differ, and so do the vectors, a little
    assert max(angles) > 0.1


def test_tissue_mask_holds_tiatoolbox_tissue_and_selects_the_same_tiles(peer: dict[str, np.ndarray]) -> None:
    ours, theirs = peer["ours_mask"], peer["mask"]
    assert ours.shape == theirs.shape
    assert (ours & theirs).sum() / theirs.sum() >= 0.95  # TIAToolbox's tissue is in ours

    def tiles_kept(mask: np.ndarray, block_px: int = 128) -> np.ndarray:
        h, w = mask.shape[0] // block_px * block_px, mask.shape[1] // block_px * block_px
        frac = mask[:h, :w].reshape(h // block_px, block_px, w // block_px, block_px).mean(axis=(1, 3))
        return frac >= 0.05

    kept_ours, kept_theirs = tiles_kept(ours), tiles_kept(theirs)
    assert kept_ours.sum() > 100
    assert (kept_ours & ~kept_theirs).sum() <= 0.02 * kept_ours.sum()    # ours adds almost none of its own
    assert (kept_theirs & ~kept_ours).sum() <= 0.03 * kept_theirs.sum()  # and misses almost none of theirs
