"""Convert any readable slide to a tiled, pyramidal BigTIFF OME-TIFF.

Takes a slide path (anything :func:`gpupath.slide.open_slide` reads, through the same reader as
``gpupath run``) and writes ``OUT.ome.tif``: level 0 in tiles of ``tile_px``, then levels 2, 4,
8, ... times smaller until one tile holds the level, each a 2 x 2 mean of the one above (rounded,
edges replicated on odd sizes; level ``i`` is ``ceil(w / 2**i) x ceil(h / 2**i)`` px). Pixels can be
stain-normalised on the way (Macenko or Vahadane, one fit per slide on its most tissue-rich tiles,
as ``run`` does).

File layout: the reduced levels are SubIFDs of level 0 (the OME-TIFF pyramid that tifffile,
Bio-Formats and QuPath read) and are also chained after level 0 in the main IFD list (so that
OpenSlide and cuCIM, which ignore SubIFDs, see the same pyramid). The OME-XML holds the physical
pixel size (µm) and the source's metadata (its ImageDescription and OpenSlide properties as a
MapAnnotation); the TIFF resolution tags hold the same pixel size per level.

Memory is bounded by a few tile rows per level: level 0 is read one strip of ``tile_px`` rows at
a time (the next strip decoded in a background thread), encoded, and handed to tifffile; each
reduced level is made from the rows of the level above as they pass, encoded when a tile row is
complete and kept, encoded, in a temporary file beside the output until level 0 is written. The
output is written under a temporary name in the output folder and renamed when complete; on any
error the temporary files are removed and one line says why.

Compression: JPEG (YCbCr 4:2:0, TIFF compression 7) and Deflate (8) open in OpenSlide, cuCIM and
tifffile; JPEG 2000 (34712) opens in tifffile (and Bio-Formats / QuPath), not in OpenSlide's
generic-TIFF reader.

Device (``ConvertParams.device``): ``cpu`` reads strips into NumPy, builds the pyramid on the host
and encodes with imagecodecs (JPEG / JPEG 2000 / Deflate, in threads). ``cuda`` reads strips onto
the GPU (decoded there by cuCIM, or uploaded once per strip from the other readers), builds every
reduced level there (the same integer 2 x 2 mean, bit-identical to the host one) and, for JPEG,
encodes each tile row on the device with nvImageCodec (the ``gpu`` extra) as baseline JPEG, YCbCr
4:2:0, the same stream layout the CPU path hands tifffile (pixels agree within JPEG tolerance, not
bit for bit); JPEG 2000 / Deflate tiles are copied to the host a tile row at a time and encoded by
imagecodecs. ``auto`` takes ``cuda`` when CuPy sees a GPU and nvImageCodec encodes a test tile,
else ``cpu`` with one note in the result's warnings saying why.
"""

from gpupath.convert._batch import ConvertOutcome, convert_slides, output_name
from gpupath.convert._core import convert_slide
from gpupath.convert._resume import convert_key, converted_before
from gpupath.convert._tiles import Compression as Compression
from gpupath.convert._tiles import ConvertDevice as ConvertDevice
from gpupath.convert._tiles import ConvertParams, ConvertResult, pyramid_dimensions
from gpupath.convert._tiles import StainMethod as StainMethod

# helpers that tests/test_convert.py and bench/bench_convert.py call directly
from gpupath.convert._core import stain_normaliser as stain_normaliser
from gpupath.convert._device import pick_device as pick_device
from gpupath.convert._tiles import encoder as encoder
from gpupath.convert._tiles import halve as halve
from gpupath.convert._tiles import tiles_of_row as tiles_of_row

__all__ = ["ConvertParams", "ConvertResult", "ConvertOutcome", "convert_slide", "convert_slides", "output_name",
           "pyramid_dimensions", "convert_key", "converted_before"]
