"""Training data: the built-in scikit-learn digits, dataset loading through `datasets`, image transforms.

Everything random in the input pipeline (crop offset, horizontal flip, epoch order) is a pure function of
``(seed, epoch, index)``: a run resumed from a checkpoint, or split over several processes, sees exactly the
same pixels as an uninterrupted single-process run. Transforms use PIL + numpy only (no torchvision).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
BAD_IMAGE_POLICIES = ("error", "skip")
CHANNEL_CHOICES = ("auto", "1", "3")
# Decoded, resized images are kept in memory up to this many bytes; above it they are decoded per item.
CACHE_LIMIT_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------------------------
# Built-in digits
# ----------------------------------------------------------------------------------------------------------

DIGITS_SPLITS = ("train", "test", "all")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def digits_split_indices(test_fraction: float = DIGITS_TEST_FRACTION, seed: int = DIGITS_SPLIT_SEED):
    """(train, test) int64 index tensors into scikit-learn's 1797 digits: a fixed seeded permutation (1438 / 359)."""
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(1797 * test_fraction))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def digits_pixels(split: str = "all"):
    """(pixels (N, 8, 8) uint8 in 0..255, labels (N,) int64) of scikit-learn's digits (values 0..16 rescaled)."""
    from sklearn.datasets import load_digits

    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {list(DIGITS_SPLITS)}, got {split!r}")
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
    labels = bunch.target.astype(np.int64)
    if split != "all":
        idx = digits_split_indices()[0 if split == "train" else 1].numpy()
        pixels, labels = pixels[idx], labels[idx]
    return pixels, labels


def load_digits_dataset(split: str = "all"):
    """scikit-learn's 8x8 digits as a ``datasets.Dataset`` of "L" PIL images + labels.

    split: 'all' (1797), 'train' (1438) or 'test' (the 359 held out for bits/dim and FDD)."""
    import datasets

    pixels, labels = digits_pixels(split)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": labels.tolist()},
        features=features,
    )


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; './x', '../x', '/x', '~/x' and existing paths are local."""
    return name.startswith(("./", "../", "/", "~")) or os.path.exists(name)


def _count_image_files(root: str) -> int:
    count = 0
    for _, _, files in os.walk(root):
        count += sum(1 for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    return count


def load_image_dataset(dataset_name: str | None = None, dataset_config_name: str | None = None,
                       train_data_dir: str | None = None, cache_dir: str | None = None, split: str = "train",
                       digits_split: str = "train"):
    """The training split as a ``datasets.Dataset``: digits (``digits_split`` of them) when no source is given, else
    a Hub name / local path (``dataset_name``) or an image folder (``train_data_dir``). Raises ValueError on a
    missing or empty source."""
    import datasets

    if dataset_name and train_data_dir:
        raise ValueError("give either --dataset_name or --train_data_dir, not both")
    if not dataset_name and not train_data_dir:
        return load_digits_dataset(digits_split)
    if train_data_dir:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"--train_data_dir {train_data_dir!r} does not exist or is not a directory")
        if _count_image_files(train_data_dir) == 0:
            raise ValueError(f"--train_data_dir {train_data_dir!r} contains no image files "
                             f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        ds = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
    else:
        if os.path.isdir(dataset_name) and (os.path.exists(os.path.join(dataset_name, "dataset_info.json"))
                                            or os.path.exists(os.path.join(dataset_name, "state.json"))):
            state_file = os.path.join(dataset_name, "state.json")
            if os.path.exists(state_file):
                import json

                with open(state_file) as f:
                    if not json.load(f).get("_data_files"):
                        raise ValueError(f"the dataset saved at --dataset_name {dataset_name!r} is empty (no data files)")
            try:
                ds = datasets.load_from_disk(dataset_name)
            except Exception as exc:
                raise ValueError(f"--dataset_name {dataset_name!r}: datasets.load_from_disk failed "
                                 f"({type(exc).__name__}: {exc})") from exc
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"--dataset_name {dataset_name!r} has no split {split!r} (has {list(ds)})")
                ds = ds[split]
        elif _looks_like_path(dataset_name) and not os.path.exists(dataset_name):
            raise ValueError(f"--dataset_name {dataset_name!r} looks like a local path but does not exist")
        else:
            try:
                ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
            except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
                raise ValueError(f"--dataset_name {dataset_name!r}: could not load it with datasets "
                                 f"({type(exc).__name__}: {exc})") from exc
    if len(ds) == 0:
        raise ValueError(f"the training dataset ({dataset_name or train_data_dir}) is empty")
    return ds


def find_image_column(ds) -> str:
    """Name of the image column: the first column with an ``Image`` feature, else 'image' / 'img'."""
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img"):
        if name in ds.column_names:
            return name
    raise ValueError(f"the dataset has no image column (columns: {ds.column_names})")


def find_label_column(ds, label_column: str | None = None) -> str | None:
    """Name of the class-label column: ``label_column`` when given (ValueError if the dataset lacks it), else the
    one ``ClassLabel`` column when there is exactly one, else None (none, or several: pass ``label_column``)."""
    import datasets

    if label_column is not None:
        if label_column not in ds.column_names:
            raise ValueError(f"label_column {label_column!r} is not a column of the dataset "
                             f"(columns: {ds.column_names})")
        return label_column
    found = [name for name, feature in ds.features.items() if isinstance(feature, datasets.ClassLabel)]
    return found[0] if len(found) == 1 else None


def class_labels_of(ds, column: str) -> tuple[np.ndarray, list[str]]:
    """(labels int64 (N,) in 0..K-1, the K class names) of ``column``: a ``ClassLabel`` keeps its names; a column
    of strings or ints is encoded first (``datasets.Dataset.class_encode_column``: sorted distinct values).
    ValueError for another type, a missing label (-1 / None) or fewer than 2 classes."""
    import datasets

    feature = ds.features[column]
    if not isinstance(feature, datasets.ClassLabel):
        if not (isinstance(feature, datasets.Value) and (feature.dtype == "string" or "int" in feature.dtype)):
            raise ValueError(f"label_column {column!r} holds {feature}, not class labels "
                             "(a ClassLabel, string or integer column)")
        if any(v is None for v in ds[column]):
            raise ValueError(f"label_column {column!r} has missing labels")
        ds = ds.class_encode_column(column)
        feature = ds.features[column]
    labels = np.asarray(ds[column], dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= feature.num_classes))
    if bad.size:
        raise ValueError(f"label_column {column!r}: row {int(bad[0])} has label {int(labels[bad[0]])}, outside "
                         f"0..{feature.num_classes - 1} ({bad.size} such rows)")
    if feature.num_classes < 2:
        raise ValueError(f"label_column {column!r} has {feature.num_classes} class; a class-conditional model "
                         "needs at least 2")
    return labels, [str(n) for n in feature.names]


def dataset_labels(ds, label_column: str | None = None, source: str = "the dataset") -> tuple[np.ndarray, list[str]]:
    """(labels int64 (N,), class names) for class-conditional training; ValueError naming ``label_column`` when
    the dataset has no usable label column (an image folder needs one subfolder per class)."""
    import datasets

    column = find_label_column(ds, label_column)
    if column is None:
        candidates = [n for n, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
        if candidates:
            raise ValueError(f"{source} has several ClassLabel columns {candidates}; choose one with --label_column")
        raise ValueError(f"{source} has no class labels: pass --label_column naming its label column (columns: "
                         f"{ds.column_names}); an image folder needs one subfolder per class (at least 2)")
    return class_labels_of(ds, column)


# ----------------------------------------------------------------------------------------------------------
# Transforms (PIL + numpy)
# ----------------------------------------------------------------------------------------------------------

def decode_image(value) -> tuple[Image.Image, str]:
    """Opens a ``datasets`` image value (PIL image, {'path','bytes'} dict, or path) -> (fully loaded image, name)."""
    import io

    if isinstance(value, Image.Image):
        value.load()
        return value, getattr(value, "filename", "") or "<in-memory image>"
    if isinstance(value, str):
        img = Image.open(value)
        img.load()
        return img, value
    if isinstance(value, dict):
        name = value.get("path") or "<in-memory image>"
        if value.get("bytes") is not None:
            img = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            img = Image.open(value["path"])
        else:
            raise ValueError("image value has neither bytes nor path")
        img.load()
        return img, name
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def is_grayscale(img: Image.Image) -> bool:
    """True for single-band modes (L, 1, I, F, LA) and palette images whose colours are all grey."""
    if img.mode in ("1", "L", "I", "I;16", "F", "LA"):
        return True
    if img.mode == "P":
        rgb = np.asarray(img.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Converts to "L" (channels=1) or "RGB" (channels=3); transparency is composited on white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode in ("I", "I;16", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8), mode="L")
    return img.convert("L" if channels == 1 else "RGB")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Scales so that min(H, W) == size (bicubic when shrinking with antialias, bilinear when enlarging)."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new == (w, h):
        return img
    resample = Image.BICUBIC if scale < 1 else Image.BILINEAR
    return img.resize(new, resample=resample, reducing_gap=None)


def crop_offsets(height: int, width: int, size: int, center: bool, generator: torch.Generator | None):
    """Top-left corner (top, left) of a size x size crop: centred, or uniform from ``generator``."""
    if center or generator is None:
        return (height - size) // 2, (width - size) // 2
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return top, left


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W) in [-1, 1] (x / 127.5 - 1)."""
    arr = pixels if pixels.ndim == 3 else pixels[:, :, None]
    return torch.from_numpy(np.array(arr.transpose(2, 0, 1), dtype=np.float32)).div_(127.5).sub_(1.0)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (numpy SeedSequence hashing): independent streams per (seed, tag, ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------------------------
# The training dataset
# ----------------------------------------------------------------------------------------------------------

@dataclass
class PreparedImages:
    """Readable images of a dataset after the checks: indices kept, channels, and what was skipped."""

    indices: list[int]
    channels: int
    skipped: list[str] = field(default_factory=list)
    cache: list[np.ndarray] | None = None
    labels: np.ndarray | None = None  # int64 (len(indices),) class of each kept image, for conditional training
    class_names: list[str] | None = None

    def with_labels(self, all_labels: np.ndarray, class_names: list[str]) -> "PreparedImages":
        """A copy carrying the labels of the kept images: ``all_labels`` (N,) is indexed by dataset row."""
        from dataclasses import replace

        return replace(self, labels=np.asarray(all_labels, dtype=np.int64)[self.indices], class_names=list(class_names))


def scan_images(ds, image_column: str, resolution: int, channels: str | int = "auto", on_bad_image: str = "error",
                cache_limit_bytes: int = CACHE_LIMIT_BYTES) -> PreparedImages:
    """Decodes every image once: finds unreadable files (ValueError naming the file, or skip with a count),
    picks the channel count ("auto": 1 if every image is grayscale, else 3) and caches resized uint8 pixels
    when they fit in ``cache_limit_bytes``."""
    import datasets

    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {list(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
    if str(channels) not in CHANNEL_CHOICES:
        raise ValueError(f"image_channels must be one of {list(CHANNEL_CHOICES)}, got {channels!r}")
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    raw = ds.cast_column(image_column, datasets.Image(decode=False)) if isinstance(
        ds.features.get(image_column), datasets.Image) else ds
    kept, skipped, grey, resized, nbytes = [], [], True, [], 0
    for i in range(len(raw)):
        value = raw[i][image_column]
        try:
            img, _ = decode_image(value)
        except Exception as exc:
            name = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else f"row {i}"
            message = f"unreadable image {name or f'row {i}'} (row {i}): {type(exc).__name__}: {exc}"
            if on_bad_image == "error":
                raise ValueError(message + " (pass --on_bad_image skip to skip unreadable images)") from exc
            logger.warning(message)
            skipped.append(name or f"row {i}")
            continue
        kept.append(i)
        grey = grey and is_grayscale(img)
        if resized is not None:
            small = resize_shorter_side(to_channels(img, 3 if not is_grayscale(img) else 1), resolution)
            resized.append(np.asarray(small))
            nbytes += resized[-1].nbytes * 3
            if nbytes > cache_limit_bytes:
                resized = None
    if not kept:
        raise ValueError(f"the training dataset has no readable image ({len(skipped)} unreadable)")
    n_channels = (1 if grey else 3) if str(channels) == "auto" else int(channels)
    if resized is not None:
        resized = [_fix_channels(a, n_channels) for a in resized]
    if skipped:
        logger.warning("skipped %d unreadable image(s) of %d", len(skipped), len(raw))
    return PreparedImages(indices=kept, channels=n_channels, skipped=skipped, cache=resized)


def _fix_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> (H, W) when channels=1 (ITU-R 601 luma as PIL), (H, W, 3) when 3."""
    if channels == 1 and arr.ndim == 3:
        return np.asarray(Image.fromarray(arr, mode="RGB").convert("L"))
    if channels == 3 and arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    return arr


class ImageTrainingDataset(torch.utils.data.Dataset):
    """Items are float32 (C, resolution, resolution) in [-1, 1]; keyed by ``(epoch, position)`` so that the random
    crop and flip of an item are a pure function of ``(seed, epoch, index)`` (exact resume, any process count).

    With ``return_labels`` (needs ``prepared.labels``) an item is ``(image, label)``, label an int64 0-d tensor, so
    a batch is ``(images (B, C, H, W), labels (B,))``."""

    def __init__(self, ds, image_column: str, prepared: PreparedImages, resolution: int, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0, return_labels: bool = False):
        if return_labels and prepared.labels is None:
            raise ValueError("return_labels=True needs class labels (PreparedImages.with_labels)")
        self.ds, self.image_column, self.prepared = ds, image_column, prepared
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.return_labels = return_labels

    @property
    def class_names(self) -> list[str] | None:
        """Names of the classes (index = label), or None for unlabelled data."""
        return self.prepared.class_names

    def __len__(self) -> int:
        return len(self.prepared.indices)

    def pixels(self, position: int) -> np.ndarray:
        """uint8 (H, W[, C]) with min(H, W) == resolution for item ``position`` (cached or decoded now)."""
        if self.prepared.cache is not None:
            return self.prepared.cache[position]
        img, _ = decode_image(self.ds[self.prepared.indices[position]][self.image_column])
        return np.asarray(resize_shorter_side(to_channels(img, self.prepared.channels), self.resolution))

    def __getitem__(self, key):
        epoch, position = key if isinstance(key, tuple) else (0, key)
        image = self.image(epoch, position)
        if self.return_labels:
            return image, torch.tensor(int(self.prepared.labels[position]), dtype=torch.int64)
        return image

    def image(self, epoch: int, position: int) -> torch.Tensor:
        """float32 (C, resolution, resolution) in [-1, 1]: item ``position`` as seen in epoch ``epoch``."""
        arr = self.pixels(position)
        gen = None
        if self.random_flip or not self.center_crop:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, 1, epoch, self.prepared.indices[position]))
        top, left = crop_offsets(arr.shape[0], arr.shape[1], self.resolution, self.center_crop, gen)
        arr = arr[top:top + self.resolution, left:left + self.resolution]
        if self.random_flip and bool(torch.rand((), generator=gen) < 0.5):
            arr = arr[:, ::-1]
        return to_unit_range(arr)


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of epoch ``epoch``: int64 (num_items,), a pure function of (seed, epoch)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(mix_seed(seed, 2, epoch)))


class PositionBatchSampler(torch.utils.data.Sampler):
    """Yields this process's slice of every global micro-batch, from micro-batch ``start`` on, forever.

    Epoch e visits ``epoch_permutation(N, seed, e)`` in global batches of ``per_process * num_processes`` items
    (an incomplete last batch is dropped); process p takes items [p * per_process, (p + 1) * per_process).
    Items are ``(epoch, index)`` keys for :class:`ImageTrainingDataset`.
    """

    def __init__(self, num_items: int, per_process: int, num_processes: int = 1, process_index: int = 0,
                 seed: int = 0, start: int = 0):
        global_batch = per_process * num_processes
        if num_items < global_batch:
            raise ValueError(f"the dataset has {num_items} images, fewer than one global batch "
                             f"(train_batch_size {per_process} x {num_processes} processes = {global_batch})")
        self.num_items, self.per_process, self.num_processes = num_items, per_process, num_processes
        self.process_index, self.seed, self.start = process_index, seed, start
        self.batches_per_epoch = num_items // global_batch

    def position(self, micro_batch: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of global micro-batch number ``micro_batch``."""
        return divmod(micro_batch, self.batches_per_epoch)

    def __iter__(self):
        micro = self.start
        epoch, k = self.position(micro)
        perm = epoch_permutation(self.num_items, self.seed, epoch)
        while True:
            if k == self.batches_per_epoch:
                epoch, k = epoch + 1, 0
                perm = epoch_permutation(self.num_items, self.seed, epoch)
            first = k * self.per_process * self.num_processes + self.process_index * self.per_process
            yield [(epoch, int(i)) for i in perm[first:first + self.per_process]]
            k += 1

    def __len__(self) -> int:  # one epoch; the iterator itself does not stop
        return self.batches_per_epoch


def build_training_data(dataset_name=None, dataset_config_name=None, train_data_dir=None, cache_dir=None,
                        resolution: int = 32, center_crop: bool = True, random_flip: bool = False,
                        image_channels: str | int = "auto", on_bad_image: str = "error", seed: int = 0,
                        digits_split: str = "train", class_conditional: bool = False, label_column: str | None = None):
    """Loads, checks and wraps the training images -> (ImageTrainingDataset, PreparedImages, source name).

    ``class_conditional``: the dataset yields (image, label) and ``prepared.class_names`` names the classes
    (digits: "0".."9"; an image folder: its subfolders; else the ``label_column``, detected when the dataset has
    exactly one ClassLabel column). The labels are read before any image is decoded."""
    ds = load_image_dataset(dataset_name, dataset_config_name, train_data_dir, cache_dir, digits_split=digits_split)
    source = dataset_name or train_data_dir or "sklearn-digits"
    if label_column is not None and not class_conditional:
        raise ValueError("label_column is only used with class_conditional=True (--class_conditional)")
    labels = dataset_labels(ds, label_column, source) if class_conditional else None
    column = find_image_column(ds)
    prepared = scan_images(ds, column, resolution, image_channels, on_bad_image)
    if labels is not None:
        prepared = prepared.with_labels(*labels)
    dataset = ImageTrainingDataset(ds, column, prepared, resolution, center_crop, random_flip, seed,
                                   return_labels=class_conditional)
    return dataset, prepared, source
