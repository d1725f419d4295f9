"""ddpm_from_scratch.data: built-in digits, loading, PIL/numpy transforms, bad input, position-keyed sampling."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_from_scratch import data as D


def _write_png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture(scope="module")
def digits():
    return D.load_digits_dataset()


def test_digits_match_sklearn(digits):
    from sklearn.datasets import load_digits

    ref = load_digits()
    assert len(digits) == 1797 == len(ref.images)
    assert digits.features["label"].names == [str(i) for i in range(10)]
    for i in (0, 1, 500, 1796):
        img = digits[i]["image"]
        assert img.mode == "L" and img.size == (8, 8)
        # 0..16 scaled to 0..255
        np.testing.assert_array_equal(np.asarray(img), np.rint(ref.images[i] * 255 / 16).astype(np.uint8))
        assert digits[i]["label"] == ref.target[i]


def test_digits_training_items_in_unit_range(digits):
    from sklearn.datasets import load_digits

    ref = load_digits().images
    prepared = D.scan_images(digits, "image", 8)
    assert prepared.channels == 1 and prepared.skipped == [] and len(prepared.indices) == 1797
    ds = D.ImageTrainingDataset(digits, "image", prepared, 8)
    for i in (0, 7, 1234):
        x = ds[(0, i)]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32
        # v in 0..16 -> 2 v / 16 - 1, up to the 8-bit rounding (half a level of 255)
        np.testing.assert_allclose(x[0].numpy(), ref[i] / 8.0 - 1.0, atol=0.5 / 127.5 + 1e-6)
    assert float(ds[(0, 0)].min()) == -1.0


def test_digits_upscaled_to_resolution(digits):
    prepared = D.scan_images(digits, "image", 16)
    x = D.ImageTrainingDataset(digits, "image", prepared, 16)[(0, 3)]
    assert x.shape == (1, 16, 16)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_center_crop_picks_the_middle(tmp_path):
    # 10 rows x 20 columns; pixel value = column index * 10: the centre 10x10 crop holds columns 5..14
    cols = np.tile(np.arange(20) * 10, (10, 1))
    _write_png(str(tmp_path / "imgs" / "a.png"), cols)
    ds, prepared, _ = D.build_training_data(train_data_dir=str(tmp_path / "imgs"), resolution=10,
                                            cache_dir=str(tmp_path / "cache"))
    x = ds[(0, 0)]
    expected = np.tile(np.arange(5, 15) * 10, (10, 1)) / 127.5 - 1.0
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6)


def test_random_crop_and_flip_are_deterministic_per_epoch_and_index(tmp_path):
    rng = np.random.default_rng(0)
    _write_png(str(tmp_path / "imgs" / "a.png"), rng.integers(0, 256, (12, 30, 3)), mode="RGB")
    ds, prepared, _ = D.build_training_data(train_data_dir=str(tmp_path / "imgs"), resolution=12, center_crop=False,
                                            random_flip=True, cache_dir=str(tmp_path / "cache"), seed=3)
    assert prepared.channels == 3
    full = np.asarray(Image.open(tmp_path / "imgs" / "a.png"), dtype=np.float64) / 127.5 - 1.0  # (12, 30, 3)
    seen_flip, seen_offsets = set(), set()
    for epoch in range(12):
        x = ds[(epoch, 0)]
        torch.testing.assert_close(x, ds[(epoch, 0)], rtol=0, atol=0)  # same key, same pixels
        arr = x.permute(1, 2, 0).numpy()
        # the output is some 12-wide window of the image, possibly mirrored
        matches = [(left, flip) for left in range(19) for flip in (False, True)
                   if np.allclose(arr, full[:, left:left + 12][:, ::-1] if flip else full[:, left:left + 12],
                                  atol=1e-6)]
        assert len(matches) == 1, epoch
        seen_offsets.add(matches[0][0])
        seen_flip.add(matches[0][1])
    assert seen_flip == {False, True} and len(seen_offsets) > 2


def test_any_size_and_auto_channels(tmp_path):
    root = tmp_path / "imgs"
    _write_png(str(root / "a" / "1.png"), np.full((7, 12), 10), mode="L")
    _write_png(str(root / "b" / "2.png"), np.full((30, 30), 200), mode="L")
    ds, prepared, _ = D.build_training_data(train_data_dir=str(root), resolution=8, cache_dir=str(tmp_path / "c1"))
    assert prepared.channels == 1 and len(ds) == 2
    assert all(ds[(0, i)].shape == (1, 8, 8) for i in range(2))
    _write_png(str(root / "b" / "3.png"), np.zeros((5, 9, 3)) + [255, 0, 0], mode="RGB")
    ds, prepared, _ = D.build_training_data(train_data_dir=str(root), resolution=8, cache_dir=str(tmp_path / "c2"))
    assert prepared.channels == 3
    reds = [ds[(0, i)] for i in range(3) if float(ds[(0, i)][0].min()) > 0.9]
    assert len(reds) == 1 and torch.allclose(reds[0][1:], -torch.ones(2, 8, 8))
    # forcing grayscale turns the red image into its ITU-R 601 luma 0.299 * 255 = 76
    ds, prepared, _ = D.build_training_data(train_data_dir=str(root), resolution=8, image_channels="1",
                                            cache_dir=str(tmp_path / "c3"))
    values = sorted(round(float(ds[(0, i)].mean() * 127.5 + 127.5)) for i in range(3))
    assert values == [10, 76, 200]


def test_unreadable_image_is_named_or_skipped(tmp_path):
    root = tmp_path / "imgs"
    for i in range(3):
        _write_png(str(root / f"ok{i}.png"), np.full((8, 8), 50 * i), mode="L")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        D.build_training_data(train_data_dir=str(root), resolution=8, cache_dir=str(tmp_path / "c"))
    ds, prepared, _ = D.build_training_data(train_data_dir=str(root), resolution=8, on_bad_image="skip",
                                            cache_dir=str(tmp_path / "c"))
    assert len(ds) == 3 and len(prepared.skipped) == 1 and prepared.skipped[0].endswith("broken.png")


def test_missing_and_empty_sources_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="train_data_dir.*does not exist"):
        D.load_image_dataset(train_data_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="train_data_dir.*no image files"):
        D.load_image_dataset(train_data_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="dataset_name.*does not exist"):
        D.load_image_dataset(dataset_name=str(tmp_path / "missing_dataset"))
    with pytest.raises(ValueError, match="either --dataset_name or --train_data_dir"):
        D.load_image_dataset(dataset_name="x", train_data_dir="y")
    with pytest.raises(ValueError, match="on_bad_image must be one of"):
        D.scan_images(D.load_digits_dataset(), "image", 8, on_bad_image="ignore")


def test_saved_dataset_loads_by_path_and_empty_one_is_refused(tmp_path, digits):
    small = digits.select(range(5))
    small.save_to_disk(str(tmp_path / "five"))
    ds = D.load_image_dataset(dataset_name=str(tmp_path / "five"))
    assert len(ds) == 5 and D.find_image_column(ds) == "image"
    digits.select([]).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="empty"):
        D.load_image_dataset(dataset_name=str(tmp_path / "none"))


def test_sampler_shards_resume_and_epochs():
    n, per, world = 23, 3, 2
    one = iter(D.PositionBatchSampler(n, per * world, 1, 0, seed=5))
    parts = [iter(D.PositionBatchSampler(n, per, world, r, seed=5)) for r in range(world)]
    batches = [next(one) for _ in range(12)]
    for b in batches:  # the process slices concatenate to the 1-process global batch
        assert sum((next(p) for p in parts), []) == b
    per_epoch = n // (per * world)
    for e in range(2):  # an epoch visits distinct items; its order is that epoch's permutation
        items = sum(batches[e * per_epoch:(e + 1) * per_epoch], [])
        assert {k[0] for k in items} == {e}
        idx = [k[1] for k in items]
        assert len(set(idx)) == len(idx) == per_epoch * per * world
        assert idx == D.epoch_permutation(n, 5, e)[:len(idx)].tolist()
    resumed = iter(D.PositionBatchSampler(n, per * world, 1, 0, seed=5, start=7))
    assert [next(resumed) for _ in range(5)] == batches[7:12]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        D.PositionBatchSampler(5, 3, 2)


# ----------------------------------------------------------------------------------------------------------
# Class labels (class-conditional training)
# ----------------------------------------------------------------------------------------------------------
def test_digits_yield_their_labels_and_names():
    from sklearn.datasets import load_digits

    ds, prepared, _ = D.build_training_data(resolution=8, class_conditional=True, digits_split="train")
    assert prepared.class_names == [str(i) for i in range(10)] and ds.class_names == prepared.class_names
    train_idx = D.digits_split_indices()[0].numpy()
    truth = load_digits().target[train_idx]
    assert np.array_equal(prepared.labels, truth)
    image, label = ds[(0, 5)]
    assert image.shape == (1, 8, 8) and label.dtype == torch.int64 and int(label) == truth[5]
    plain, _, _ = D.build_training_data(resolution=8, digits_split="train")
    assert torch.equal(plain[(0, 5)], image)  # the same pixels, without the label
    batch = torch.utils.data.default_collate([ds[(0, i)] for i in range(4)])
    assert batch[0].shape == (4, 1, 8, 8) and batch[1].tolist() == truth[:4].tolist()


def test_image_folder_subfolders_become_classes_and_skips_keep_alignment(tmp_path):
    root = tmp_path / "imgs"
    for cls, value in (("apple", 20), ("kiwi", 120), ("pear", 220)):
        for i in range(2):
            _write_png(str(root / cls / f"{i}.png"), np.full((8, 8), value), mode="L")
    (root / "kiwi" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    ds, prepared, _ = D.build_training_data(train_data_dir=str(root), resolution=8, on_bad_image="skip",
                                            class_conditional=True, cache_dir=str(tmp_path / "c"))
    assert prepared.class_names == ["apple", "kiwi", "pear"] and len(ds) == 6
    for i in range(len(ds)):  # each image's label is its folder's (the skipped file shifts nothing)
        image, label = ds[(0, i)]
        value = round(float(image.mean() * 127.5 + 127.5))
        assert prepared.class_names[int(label)] == {20: "apple", 120: "kiwi", 220: "pear"}[value]


def test_an_image_folder_without_class_subfolders_is_refused(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        _write_png(str(root / f"{i}.png"), np.full((8, 8), 10 * i), mode="L")
    with pytest.raises(ValueError, match="no class labels.*--label_column.*one subfolder per class"):
        D.build_training_data(train_data_dir=str(root), resolution=8, class_conditional=True,
                              cache_dir=str(tmp_path / "c"))


def _labelled_dataset(**columns):
    import datasets

    images = [Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8), mode="L") for i in range(4)]
    features = {"image": datasets.Image()}
    data = {"image": images}
    for name, (values, feature) in columns.items():
        data[name], features[name] = values, feature
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def test_label_column_detection_and_choice(tmp_path):
    import datasets

    fine = datasets.ClassLabel(names=["a", "b", "c", "d"])
    coarse = datasets.ClassLabel(names=["low", "high"])
    one = _labelled_dataset(fine=([3, 2, 1, 0], fine))
    assert D.find_label_column(one) == "fine"
    assert D.dataset_labels(one)[0].tolist() == [3, 2, 1, 0]
    two = _labelled_dataset(fine=([3, 2, 1, 0], fine), coarse=([1, 1, 0, 0], coarse))
    assert D.find_label_column(two) is None
    with pytest.raises(ValueError, match=r"several ClassLabel columns \['fine', 'coarse'\].*--label_column"):
        D.dataset_labels(two)
    labels, names = D.dataset_labels(two, "coarse")
    assert labels.tolist() == [1, 1, 0, 0] and names == ["low", "high"]
    with pytest.raises(ValueError, match="label_column 'nope' is not a column"):
        D.dataset_labels(two, "nope")
    # a saved dataset through build_training_data
    two.save_to_disk(str(tmp_path / "saved"))
    ds, prepared, _ = D.build_training_data(dataset_name=str(tmp_path / "saved"), resolution=8,
                                            class_conditional=True, label_column="fine")
    assert prepared.class_names == ["a", "b", "c", "d"] and [int(ds[(0, i)][1]) for i in range(4)] == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="label_column is only used with class_conditional"):
        D.build_training_data(dataset_name=str(tmp_path / "saved"), resolution=8, label_column="fine")


def test_string_and_bad_label_columns():
    import datasets

    words = _labelled_dataset(kind=(["owl", "cat", "owl", "cat"], datasets.Value("string")))
    labels, names = D.dataset_labels(words, "kind")
    assert names == ["cat", "owl"] and labels.tolist() == [1, 0, 1, 0]
    floats = _labelled_dataset(score=([0.1, 0.2, 0.3, 0.4], datasets.Value("float32")))
    with pytest.raises(ValueError, match="label_column 'score' holds .*not class labels"):
        D.dataset_labels(floats, "score")
    missing = _labelled_dataset(fine=([0, -1, 1, 0], datasets.ClassLabel(names=["a", "b"])))
    with pytest.raises(ValueError, match="row 1 has label -1"):
        D.dataset_labels(missing)
    single = _labelled_dataset(fine=([0, 0, 0, 0], datasets.ClassLabel(names=["a"])))
    with pytest.raises(ValueError, match="at least 2"):
        D.dataset_labels(single)
    with pytest.raises(ValueError, match="return_labels=True needs class labels"):
        prepared = D.scan_images(single, "image", 8)
        D.ImageTrainingDataset(single, "image", prepared, 8, return_labels=True)
