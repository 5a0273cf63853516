"""Image codec: sub-pixels quantised to `levels` values, one token each, in a chosen ordering.

An item is one image of C×H×W sub-pixels (C = 1 grey or 3 RGB), so `sequence_length()` is
C·H·W and a model sees shape (C, H, W). Tokens are stored in the ordering (see ordering.py):
a 1-D model (GPT, GRU) reads them as they come, PixelCNN needs the raster ordering.

Inputs, by file type:
  PNG, JPEG, … (files or an image folder)  one image each, decoded by Pillow
  parquet (e.g. an HF imagefolder pushed  one image per row of --image-field, read with
    to parquet)                           decode=False and decoded here, so one bad row is a
                                          counted skip, not a failed file
  .npz / .npy / IDX (*-idx3-ubyte[.gz])   one image per row of an (N, H, W[, C]) array:
                                          MNIST, Fashion-MNIST, scikit-learn's digits
Every image is converted to grey or RGB, scaled and centre-cropped to H×W (Pillow's
ImageOps.fit), and 0–255 is quantised to levels L by floor(v·L/256) (L = 2 binarises at 128).
Samples go back with level·255/(L−1), so L = 256 round-trips exactly.
"""

import contextlib
import gzip
import io
import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps  # at import: a function-level import would cost every image

from pipeline import ArpipeError
from pipeline.codecs import Codec, Encoded
from pipeline.codecs.ordering import ORDERINGS, inverse, permutation
from pipeline.data.hf_inputs import DatasetPart, import_datasets
from pipeline.data.sources import (Record, Records, in_batches, read_bytes, readable, relative_name,
                                   require_regular_file)

ARRAY_SUFFIXES = (".npz", ".npy")
IDX = re.compile(r"idx\d-ubyte(\.gz)?$|\.idx(\.gz)?$")
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
BLOCK_BYTES = 8 << 20  # array files are read this much at a time
IMAGE_BATCH = 256  # images per Records from an array file, parquet file or dataset (already at the codec's size)


class ImageCodec(Codec):
    modality = "image"
    help = "images (PNG/JPEG files or folders, parquet image columns, IDX/npz/npy arrays) as quantised sub-pixels"
    stream_mode = "item"
    unit = "dim"

    def __init__(self, height: int, width: int, channels: int, levels: int, ordering: str = "raster"):
        if channels not in (1, 3):
            raise ArpipeError(f"channels must be 1 (grey) or 3 (RGB), not {channels}")
        if not 2 <= levels <= 256:
            raise ArpipeError(f"levels must be in 2..256, not {levels}")
        if height < 1 or width < 1:
            raise ArpipeError(f"image size {height}x{width} is empty")
        self.height, self.width, self.channels, self.levels = height, width, channels, levels
        self.ordering = ordering
        self.vocab_size = levels
        self.perm = permutation(ordering, channels, height, width)  # raises for an unknown ordering
        self.inv = inverse(self.perm)
        self.raster = bool(np.array_equal(self.perm, np.arange(len(self.perm))))

    # --- the shard stage's command line
    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.description = ("Shard images: PNG/JPEG files or folders, parquet image columns, and IDX/npz/npy "
                              "arrays of shape (N, H, W[, C]). Undecodable images are counted and skipped.")
        parser.add_argument("--size", type=parse_size, metavar="HxW",
                            help="scale and centre-crop every image to HxW (default: the first image's size)")
        parser.add_argument("--channels", type=int, choices=(1, 3),
                            help="1 = grey, 3 = RGB (default: the first image's)")
        parser.add_argument("--levels", type=int, default=256, metavar="L",
                            help="quantise 0-255 to L values, the vocabulary (2 binarises)")
        parser.add_argument("--ordering", choices=ORDERINGS, default="raster",
                            help="the order of pixels in a token row (PixelCNN needs raster)")
        parser.add_argument("--image-field", default="image", help="parquet column holding the images")
        parser.add_argument("--array-key", help="the .npz array to read (default: the only 3-D or 4-D one)")

    @classmethod
    def shard_settings(cls, args) -> dict:
        if not 2 <= args.levels <= 256:
            raise ArpipeError(f"--levels must be in 2..256, not {args.levels}")
        return {"size": args.size, "channels": args.channels, "levels": args.levels, "ordering": args.ordering,
                "image_field": args.image_field, "array_key": args.array_key}

    @classmethod
    def maker(cls, settings: dict, args):
        def make(inputs: list, root: Path, out: Path) -> "ImageCodec":
            size, channels = settings["size"], settings["channels"]
            if size is None or channels is None:  # take what is missing from the first readable image
                h, w, c = first_image_shape(inputs, root, settings)
                size, channels = size or [h, w], channels or c
            return cls(size[0], size[1], channels, settings["levels"], settings["ordering"])

        return make

    @classmethod
    def from_config(cls, config: dict, root: Path) -> "ImageCodec":
        return cls(config["height"], config["width"], config["channels"], config["levels"], config["ordering"])

    def config(self) -> dict:
        return {"modality": self.modality, "vocab_size": self.vocab_size, "height": self.height,
                "width": self.width, "channels": self.channels, "levels": self.levels, "ordering": self.ordering}

    # --- shapes
    def sequence_length(self, block_len: int) -> int:
        return self.channels * self.height * self.width

    def model_shape(self, block_len: int) -> tuple[int, ...]:
        return (self.channels, self.height, self.width)

    @property
    def default_prompt_len(self) -> int:
        return self.sequence_length(0) // 2  # the top half in raster order, the first half of any ordering

    # --- records and tokens
    def read_records(self, path: str | DatasetPart, root: Path, settings: dict):
        """The input's images as Records (one for an image file, batches for array files, parquet
        and datasets): pixels scaled and cropped to the codec's size right away (a batch then holds
        small images, whatever the sources' size), item metas (key and source size) ready."""
        records = read_images(path, root, settings["image_field"], settings["array_key"])
        if isinstance(records, list):  # an image file: its one record, without a generator around it
            return [Records.of([self.fitted(record) for record in records])]
        return in_batches(map(self.fitted, records), IMAGE_BATCH)

    def fitted(self, record: Record) -> Record:
        if record.skip:
            return record
        # "size" is the source image's [height, width], before scaling and cropping
        size = list(source_shape(record.value)[:2])
        return Record(record.key, self.pixels(record.value), meta={"key": record.key, "size": size})

    def encode_records(self, records: Records) -> Encoded:
        images = records.values  # each (H, W, C): end to end, they are the stack (np.stack costs twice as much)
        rows = self.tokens(np.concatenate(images).reshape(len(images), self.height, self.width, self.channels))
        return Encoded(rows.reshape(-1), np.full(len(rows), rows.shape[1]), records.metas)

    def pixels(self, value) -> np.ndarray:
        """A Pillow image or a uint8 array (H, W[, C]) as uint8 (height, width, channels)."""
        if isinstance(value, np.ndarray):
            grey = value.ndim == 2 or value.shape[2] == 1
            if value.shape[:2] == (self.height, self.width) and (grey if self.channels == 1 else value.ndim == 3
                                                                   and value.shape[2] == 3):
                return value.reshape(self.height, self.width, self.channels)  # what Pillow would return
            value = Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[2] == 1 else value)
        mode = "L" if self.channels == 1 else "RGB"
        image = value if value.mode == mode else value.convert(mode)
        if image.size != (self.width, self.height):
            image = ImageOps.fit(image, (self.width, self.height), method=Image.Resampling.LANCZOS)
        # L and RGB are one byte per sub-pixel: the raw bytes are the array (np.asarray's detour
        # through __array_interface__ costs as much again for a small image)
        return np.frombuffer(image.tobytes(), np.uint8).reshape(self.height, self.width, self.channels)

    def tokens(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, C) uint8 -> the quantised sub-pixels in the ordering; a stack of images (n, H,
        W, C) -> one row each."""
        flat = pixels.reshape(*pixels.shape[:-3], -1)
        if self.levels < 256:  # 256 levels are the bytes themselves
            flat = (flat.astype(np.uint16) * self.levels) >> 8
        if not self.raster:  # gathering a row in its own order is a copy of it
            flat = flat[..., self.perm]
        return flat.astype(self.token_dtype)

    def to_pixels(self, rows: np.ndarray) -> np.ndarray:
        """Token rows (n, D) in the ordering -> uint8 images (n, H, W, C), de-quantised."""
        levels = np.asarray(rows, dtype=np.int64)[:, self.inv].clip(0, self.levels - 1)
        values = np.rint(levels * 255 / (self.levels - 1)).astype(np.uint8)
        return values.reshape(-1, self.height, self.width, self.channels)

    def write_samples(self, rows, directory: Path, name: str, prefix_len: int = 0,
                      given: np.ndarray | None = None) -> list[Path]:
        """One PNG grid. For completions given the first prefix_len variables a red line marks
        the edge of the given region (the pixels whose sub-pixels were all given): under snake or
        Hilbert orderings that region is not a simple top half, and the line shows it without
        tinting the image itself. `given`, a (D,) bool over the rows' positions, is for a model
        with its own ordering (MADE), whose given variables may lie anywhere: each completion is
        then followed by a map of exactly those sub-pixels (full intensity: given; black: sampled)."""
        images = self.to_pixels(rows)
        pair = 1
        if given is not None:
            given_map = self.to_pixels(np.asarray(given, dtype=np.int64)[None] * (self.levels - 1))[0]
            images = np.stack([image for completion in images for image in (completion, given_map)])
            pair = 2  # a completion and its map side by side
        if self.channels == 1:
            images = np.repeat(images, 3, axis=-1)
        given = np.zeros(self.height * self.width * self.channels, dtype=bool)
        given[self.perm[:prefix_len]] = True
        given = given.reshape(self.height, self.width, self.channels).all(-1)
        scale = max(1, 64 // max(self.height, self.width))  # 8×8 digits become visible
        images = images.repeat(scale, 1).repeat(scale, 2)
        if prefix_len:
            images[:, edge(given.repeat(scale, 0).repeat(scale, 1))] = (255, 0, 0)
        n = len(images)
        cols = pair * int(np.ceil(np.sqrt(n / pair)))
        rows_n = int(np.ceil(n / cols))
        h, w, pad = images.shape[1], images.shape[2], 2
        grid = np.full((rows_n * (h + pad) + pad, cols * (w + pad) + pad, 3), 128, dtype=np.uint8)
        for i, image in enumerate(images):
            y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
            grid[y : y + h, x : x + w] = image
        path = Path(directory) / f"{name}.png"
        Image.fromarray(grid).save(path)
        return [path]


def edge(mask: np.ndarray) -> np.ndarray:
    """Cells of `mask` next to a cell outside it (4-neighbourhood; the image border is not an edge)."""
    padded = np.pad(mask, 1, constant_values=True)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def parse_size(value: str) -> list[int]:
    """'28x28' or '32' -> [height, width]."""
    import argparse

    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", value.strip())
    if not match or int(match[1]) < 1 or (match[2] and int(match[2]) < 1):
        raise argparse.ArgumentTypeError(f"expected HxW such as 28x28, got {value!r}")
    return [int(match[1]), int(match[2] or match[1])]


# --- readers: one Record per image; a file that cannot be read raises (shards.run_task records it)
def read_images(path: str | DatasetPart, root: Path, image_field: str = "image", array_key: str | None = None):
    """The records of one input, one per image: a list for an image file (the common case, kept
    cheap), else an iterator."""
    if isinstance(path, DatasetPart):
        return (cell_image(key, cell, path.resolve) for key, cell in path.cells(image_field, "--image-field"))
    name = relative_name(path, root)
    lower = path.lower()
    if lower.endswith(ARRAY_SUFFIXES) or IDX.search(lower):
        return (Record(f"{name}:{index}", image) for index, image in enumerate(array_images(path, array_key)))
    if lower.endswith(".parquet"):
        return read_parquet(path, name, image_field)
    return [Record(f"{name}:0", decode_image(path))]


def decode_image(source):
    """A fully decoded Pillow image from a path or bytes (truncated or corrupt data raise here,
    not later; so do images above Pillow's decompression-bomb limit)."""
    data = source if isinstance(source, bytes) else read_bytes(source)  # faster than Pillow's own open
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:  # Pillow's message would name the BytesIO object
        what = f"data ({len(data)} bytes)" if isinstance(source, bytes) else f"file {os.fspath(source)!r}"
        raise Image.UnidentifiedImageError(f"cannot identify image {what}") from None
    image.load()
    if "exif" in image.info or image.format == "TIFF":  # where an orientation tag can be
        image = ImageOps.exif_transpose(image)  # camera JPEGs: the orientation the viewer shows
    return image


def cell_image(key: str, cell: dict | None, resolve) -> Record:
    """The record of an HF Image cell ({bytes, path}): one that cannot be decoded is a skip."""
    try:
        return Record(key, decode_image(cell["bytes"] if cell["bytes"] is not None else resolve(cell["path"])))
    except Exception:  # Pillow raises several types for bad data; a cell may be None or lack both
        return Record(key, skip="undecodable image")


def read_parquet(path: str, name: str, field: str):
    datasets = import_datasets()
    rows = datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True)
    if rows.features is not None and field not in rows.features:
        raise ValueError(f"no {field!r} column (columns: {sorted(rows.features)})")
    rows = rows.cast_column(field, datasets.Image(decode=False))  # we decode, so a bad row is one skip
    for index, row in enumerate(rows):
        yield cell_image(f"{name}:{index}", row[field], lambda p: os.path.join(os.path.dirname(path), p))


def array_images(path: str | Path, key: str | None = None):
    """The uint8 images (H, W[, C]) of an .npy / .npz / IDX file, read BLOCK_BYTES at a time:
    an IDX file may be gzipped and a .npz member deflated, so a small file can inflate to
    gigabytes. Images above Pillow's decompression-bomb limit are refused as Pillow refuses them."""
    with contextlib.ExitStack() as stack:
        f, dtype, shape = open_array(path, key, stack)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
            raise ValueError(f"expected images (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got shape {shape}")
        if shape[1] * shape[2] > 2 * Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"images of {shape[1]}x{shape[2]} pixels exceed the decompression-bomb limit "
                             f"of {2 * Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS × 2)")
        image_bytes = dtype.itemsize * math.prod(shape[1:])
        per_block = max(1, BLOCK_BYTES // max(1, image_bytes))
        for start in range(0, shape[0], per_block):
            count = min(per_block, shape[0] - start)
            data = f.read(count * image_bytes)
            if len(data) < count * image_bytes:
                raise ValueError(f"the data ends after {start + len(data) // image_bytes} images; "
                                 f"the header says {shape[0]}")
            yield from uint8_images(np.frombuffer(data, dtype).reshape(count, *shape[1:]))


def open_array(path: str | Path, key: str | None, stack: contextlib.ExitStack):
    """(stream at the first value, dtype, shape) of an .npy, a .npz member or an IDX file."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        archive = stack.enter_context(zipfile.ZipFile(path))
        headers = {}
        for member in archive.namelist():
            if member.endswith(".npy"):
                with archive.open(member) as f:
                    headers[member[:-4]] = npy_header(f)
        if key is None:
            candidates = [k for k, (_, shape) in headers.items() if len(shape) in (3, 4)]
            if len(candidates) != 1:
                raise ValueError(f"pass --array-key: {len(candidates)} 3-D/4-D arrays among {sorted(headers)}")
            key = candidates[0]
        if key not in headers:
            raise ValueError(f"no array {key!r} (arrays: {sorted(headers)})")
        f = stack.enter_context(archive.open(key + ".npy"))
        return (f, *npy_header(f))
    if suffix == ".npy":
        f = stack.enter_context(open(path, "rb"))
        return (f, *npy_header(f))
    f = stack.enter_context((gzip.open if suffix == ".gz" else open)(path, "rb"))
    dtype, shape = idx_header(f)
    if suffix != ".gz":  # an IDX file's size is its header's promise: check it before reading
        values = (os.fstat(f.fileno()).st_size - 4 - 4 * len(shape)) / dtype.itemsize
        if values != math.prod(shape):
            raise ValueError(f"IDX data holds {values:g} values, its header says {shape}")
    return f, dtype, shape


def npy_header(f) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of a .npy stream, which is left at the first value. Object arrays (which
    would need unpickling) and Fortran order (not readable image by image) are refused."""
    version = np.lib.format.read_magic(f)
    shape, fortran_order, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(f))
    if dtype.hasobject:
        raise ValueError("an object array (it would need unpickling): arrays must hold numbers")
    if fortran_order and len(shape) > 1:
        raise ValueError("a Fortran-ordered array: save it C-ordered (np.ascontiguousarray)")
    return dtype, shape


def idx_header(f) -> tuple[np.dtype, tuple[int, ...]]:
    """The IDX format of (Fashion-)MNIST: 2 zero bytes, a dtype code, ndim, big-endian int32
    dims, then the data, where `f` is left."""
    head = f.read(4)
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in IDX_DTYPES:
        raise ValueError("not an IDX file")
    dims = f.read(4 * head[3])
    if len(dims) < 4 * head[3]:
        raise ValueError("not an IDX file")
    return np.dtype(IDX_DTYPES[head[2]]), tuple(int(d) for d in np.frombuffer(dims, ">i4"))


def uint8_images(array: np.ndarray):
    """uint8 images (H, W[, C]) from a block (n, H, W[, C]) whose values are 0–255 (any integer
    or bool type) or 0–1 (floats)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(f"float images must lie in [0, 1], found [{array.min()}, {array.max()}]")
        array = np.rint(array * 255).astype(np.uint8)
    elif array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"integer images must lie in 0..255, found {array.min()}..{array.max()}")
    yield from array.astype(np.uint8, copy=False)


def source_shape(value) -> tuple[int, int, int]:
    """(height, width, channels) of a record's image as read: grey (1) or colour (3)."""
    if isinstance(value, np.ndarray):
        return value.shape[0], value.shape[1], 1 if value.ndim == 2 or value.shape[2] == 1 else 3
    return value.height, value.width, 1 if value.mode in GREY_MODES else 3


def first_image_shape(inputs: list, root: Path, settings: dict) -> tuple[int, int, int]:
    """(height, width, channels) of the first readable image, for --size/--channels defaults."""
    for item in inputs:
        try:
            if isinstance(item, str):
                require_regular_file(item)  # a FIFO would block
            for record in read_images(readable(item), root, settings["image_field"], settings["array_key"]):
                if record.skip is None:
                    return source_shape(record.value)
        except Exception:  # unreadable: the shard task reports it; look at the next input
            continue
    raise ArpipeError("no readable image among the inputs to take the size and channels from; "
                      "pass --size and --channels")
