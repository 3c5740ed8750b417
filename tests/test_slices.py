"""2.5D slicing: neighbours as channels, edges replicated, padding, foreground-aware sampling."""
from __future__ import annotations

import numpy as np
import torch

from seg_transfer.data.slices import SliceDataset, SliceIndex, context_indices, foreground_slices, pad_to_multiple, slab
from seg_transfer.routes.slicewise import predict_volume


def _volume(shape=(5, 6, 7)):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)


def test_context_indices_repeat_edge_slices():
    assert context_indices(0, 7, 1).tolist() == [0, 0, 1]
    assert context_indices(6, 7, 1).tolist() == [5, 6, 6]
    assert context_indices(3, 7, 2).tolist() == [1, 2, 3, 4, 5]
    assert context_indices(0, 1, 2).tolist() == [0, 0, 0, 0, 0]


def test_slab_stacks_neighbours_along_each_axis():
    volume = _volume()
    for axis in range(3):
        depth = volume.shape[1 + axis]
        for index in (0, depth // 2, depth - 1):
            out = slab(volume, axis, index, 1)
            expected = [np.take(volume[0], i, axis=axis) for i in context_indices(index, depth, 1)]
            assert out.shape == (3, *expected[0].shape)
            assert np.array_equal(out, np.stack(expected))
    assert slab(volume, 2, 3, 0).shape == (1, 5, 6)


def test_pad_to_multiple_pads_at_the_end_only():
    array = np.ones((3, 35, 50))
    padded = pad_to_multiple(array, 32, value=-1)
    assert padded.shape == (3, 64, 64)
    assert np.array_equal(padded[:, :35, :50], array) and (padded[:, 35:] == -1).all()
    assert pad_to_multiple(np.ones((2, 64, 32)), 32).shape == (2, 64, 32)


def test_foreground_aware_sampling_share_and_determinism():
    index = SliceIndex([10, 10], [np.array([2, 3]), np.array([5])])
    assert len(index) == 20 and len(index.foreground) == 3
    order = index.epoch_order(seed=0, epoch=1, size=200, foreground_fraction=0.5)
    assert len(order) == 200
    assert np.isin(order, index.foreground).sum() >= 100  # half drawn from labelled slices, plus chance hits
    assert np.array_equal(order, index.epoch_order(seed=0, epoch=1, size=200, foreground_fraction=0.5))
    assert not np.array_equal(order, index.epoch_order(seed=0, epoch=2, size=200, foreground_fraction=0.5))
    assert sorted(index.epoch_order(0, 0, None, None).tolist()) == list(range(20))


def test_epoch_is_the_budgeted_size_whatever_the_pool():
    """An epoch of ``size`` slices is ``size`` slices even when the training set holds fewer (issue 10)."""
    small = SliceIndex([35] * 5, [np.arange(10, 20)] * 5)  # 175 slices, as 5 Hippocampus cases
    order = small.epoch_order(0, 0, 1000, None)
    assert len(order) == 1000
    counts = np.bincount(order, minlength=len(small))
    assert counts.min() == 5 and counts.max() == 6  # cycled passes: every slice seen equally often
    large = SliceIndex([35] * 40, [np.arange(10, 20)] * 40)  # 1400 slices
    cut = large.epoch_order(0, 0, 1000, None)
    assert len(cut) == 1000 and len(np.unique(cut)) == 1000
    for fraction in (None, 0.5):
        assert len(small.epoch_order(3, 7, 64, fraction)) == len(large.epoch_order(3, 7, 64, fraction)) == 64


def test_slice_dataset_items_are_padded_and_labelled():
    image = torch.from_numpy(_volume((30, 40, 4)))
    label = torch.zeros(1, 30, 40, 4, dtype=torch.uint8)
    label[0, 10:20, 10:20, 1] = 2
    dataset = SliceDataset([{"image": image, "label": label}], axis=2, context=1, multiple=32)
    assert foreground_slices(label, 2).tolist() == [1]
    item = dataset[1]
    assert item["image"].shape == (3, 32, 64) and item["label"].shape == (1, 32, 64)
    assert item["label"].dtype == torch.int64 and int(item["label"].max()) == 2
    assert torch.equal(item["image"][:, :30, :40], torch.from_numpy(slab(image, 2, 1, 1)))


def test_predict_volume_feeds_each_slice_with_its_neighbours():
    """A 'model' that returns its input channels as logits shows what each slice was fed."""

    class Echo(torch.nn.Module):
        def forward(self, x):
            return x * 1000.0  # softmax becomes one-hot on the brightest channel

    volume = torch.zeros(1, 4, 5, 6)
    for z in range(6):
        volume[0, :, :, z] = z
    probs = predict_volume(Echo().eval(), volume, axis=2, context=1, batch_size=4, multiple=32)
    assert probs.shape == (3, 4, 5, 6)
    # the brightest of (z-1, z, z+1) is the next slice, except at the last slice (edge repeated)
    winner = probs.argmax(0)
    assert (winner[..., :5] == 2).all()
    assert (winner[..., 5] == 1).all()


def test_batches_of_slabs_of_different_sizes_are_plain_padded_tensors():
    """MONAI's pad collate returns MetaTensors where it pads (about 8% slower per CPU step); ours returns plain
    tensors with the same padded values."""
    from monai.data import MetaTensor, pad_list_data_collate

    from seg_transfer.data.pipeline import padded_batch

    items = [{"image": torch.full((3, 32, 32), 1.0), "label": torch.ones(1, 32, 32, dtype=torch.int64)},
             {"image": torch.full((3, 32, 64), 2.0), "label": torch.ones(1, 32, 64, dtype=torch.int64)}]
    batch, monai_batch = padded_batch(items), pad_list_data_collate(items)
    assert isinstance(monai_batch["image"], MetaTensor)
    for key in ("image", "label"):
        assert type(batch[key]) is torch.Tensor and batch[key].shape[-2:] == (32, 64)
        assert torch.equal(batch[key], monai_batch[key].as_tensor())
    assert batch["image"][0, :, :, 16:48].eq(1.0).all() and batch["image"][0, :, :, :16].eq(0.0).all()


def test_augmentation_can_be_switched_off_and_on_between_epochs():
    """``stages[].augment``: a stage switches the dataset's augmentation; off gives the plain slabs exactly."""
    from seg_transfer.config import AugmentConfig
    from seg_transfer.data.augment import SliceAugmenter

    rng = np.random.default_rng(0)
    volumes = [{"image": rng.normal(size=(1, 32, 32, 6)).astype(np.float32),
                "label": (rng.random((1, 32, 32, 6)) > 0.7).astype(np.int64)}]
    plain = SliceDataset(volumes, axis=2, context=1, multiple=32)
    switched = SliceDataset(volumes, axis=2, context=1, multiple=32, augment=SliceAugmenter(AugmentConfig(rotate_degrees=20)))
    for dataset in (plain, switched):
        dataset.set_epoch(0, 0, 6, None)
    augmented = [switched[i]["image"] for i in range(6)]
    switched.set_augmentation(False)
    assert all(torch.equal(switched[i]["image"], plain[i]["image"]) for i in range(6))
    switched.set_augmentation(True)
    assert all(torch.equal(switched[i]["image"], augmented[i]) for i in range(6))
    assert not all(torch.equal(a, plain[i]["image"]) for i, a in enumerate(augmented))
