"""The PyTorch loaders, CPU-only with parallel workers: batch dicts, epoch coverage over ranks,
set_epoch, validation masking, bad samples."""
import pytest
import torch
from conftest import NUM_CLASSES, make_dataset

from relabel_dali.config import ConfigError
from relabel_dali.data.loader import HOST_METADATA, build_train_loader, build_val_loader
from relabel_dali.data.settings import Dataset, Labels, Runtime, TrainAugment, ValTransform
from relabel_dali.data.listing import BadSampleError

RUNTIME = Runtime(num_threads=1, py_workers=1)
AUGMENT = TrainAugment(image_size=32)


def train_loader(image_root, label_root=None, *, batch_size, on_bad_sample="fail", num_classes=NUM_CLASSES,
                 runtime=RUNTIME, augment=AUGMENT, preflight_decodes=0, **kwargs):
    dataset = Dataset(image_root, num_classes=num_classes, on_bad_sample=on_bad_sample,
                      preflight_decodes=preflight_decodes)
    labels = Labels(label_root) if label_root is not None else None
    return build_train_loader(dataset, batch_size=batch_size, labels=labels, augment=augment, runtime=runtime,
                              **kwargs)


def indices_of_epoch(loader):
    return torch.cat([batch["indices"] for batch in loader]).tolist()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("loader"), classes=3, per_class=4)  # 12 samples


class TestTrainLoader:
    @pytest.mark.parametrize("dtype", ["float32", "float16"])
    def test_batch_dict(self, dataset, dtype):
        image_root, _, _ = dataset
        loader = train_loader(image_root, batch_size=4, runtime=Runtime(num_threads=1, py_workers=1, dtype=dtype))
        assert len(loader) == 3
        batches = list(loader)
        assert len(batches) == 3
        batch = batches[0]
        assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == getattr(torch, dtype)
        assert batch["targets"].shape == (4, NUM_CLASSES) and batch["targets"].dtype == torch.float32
        assert batch["boxes"].shape == (4, 4) and batch["boxes"].dtype == torch.float32
        assert batch["labels"].dtype == batch["indices"].dtype == torch.int64
        assert torch.equal(batch["targets"], torch.nn.functional.one_hot(batch["labels"], NUM_CLASSES).float())

    @pytest.mark.parametrize("world_size,batch_size", [(2, 3), (2, 2), (3, 4)])
    def test_ranks_cover_every_sample_exactly_once(self, dataset, world_size, batch_size):
        image_root, _, _ = dataset
        seen = []
        for rank in range(world_size):
            loader = train_loader(image_root, batch_size=batch_size, rank=rank, world_size=world_size, seed=5)
            assert len(loader) == 12 // (world_size * batch_size)
            seen += indices_of_epoch(loader)
        assert sorted(seen) == list(range(12))

    def test_orders_differ_between_epochs_and_repeat_for_a_seed(self, dataset):
        image_root, _, _ = dataset
        loader = train_loader(image_root, batch_size=4, seed=11)
        epochs = [indices_of_epoch(loader) for _ in range(3)]
        assert loader.epoch == 3
        assert len({tuple(e) for e in epochs}) == 3 and all(sorted(e) == list(range(12)) for e in epochs)
        again = train_loader(image_root, batch_size=4, seed=11)
        assert indices_of_epoch(again) == epochs[0]
        other = train_loader(image_root, batch_size=4, seed=12)
        assert indices_of_epoch(other) != epochs[0]
        # Resuming at an epoch boundary, by set_epoch or by start_epoch, replays that epoch's order.
        again.set_epoch(2)
        assert indices_of_epoch(again) == epochs[2] and again.epoch == 3
        resumed = train_loader(image_root, batch_size=4, seed=11, start_epoch=1)
        assert indices_of_epoch(resumed) == epochs[1]

    def test_abandoned_epoch_restarts_cleanly(self, dataset):
        image_root, _, _ = dataset
        loader = train_loader(image_root, batch_size=4, seed=2)
        full = indices_of_epoch(loader)
        loader.set_epoch(0)
        next(iter(loader))
        loader.set_epoch(0)
        assert indices_of_epoch(loader) == full

    def test_pad_policy_with_a_remainder(self, dataset):
        image_root, _, _ = dataset
        loader = train_loader(image_root, batch_size=5)
        seen = indices_of_epoch(loader)
        assert len(seen) == 15 and set(seen) == set(range(12))

    def test_soft_targets(self, dataset):
        image_root, label_root, _ = dataset
        loader = train_loader(image_root, label_root, batch_size=4)
        for batch in loader:
            assert torch.allclose(batch["targets"].sum(1), torch.ones(4), atol=1e-5)
            assert not torch.equal(batch["targets"], torch.nn.functional.one_hot(batch["labels"], NUM_CLASSES).float())

    def test_bad_arguments(self, dataset):
        image_root, label_root, _ = dataset
        with pytest.raises(ConfigError, match="label maps cover 16 classes, data.num_classes is 1000"):
            train_loader(image_root, label_root, batch_size=4, num_classes=1000)
        with pytest.raises(ConfigError, match="class_map gives index 2, outside data.num_classes=2"):
            train_loader(image_root, batch_size=4, num_classes=2)
        with pytest.raises(ValueError, match="device mps: expected 'cpu' or 'cuda"):
            Runtime(device="mps")

    def test_one_pipeline_serves_every_epoch_and_a_resume_replays_them(self, dataset):
        # Epochs 0-2 of one run == epoch 2 of a loader started there, value for value: images
        # (crop, flip, jitter, lighting), boxes, pooled targets, labels, indices.
        image_root, label_root, _ = dataset
        loader = train_loader(image_root, label_root, batch_size=4, seed=9)
        epochs = [[{k: v.clone() for k, v in batch.items()} for batch in loader] for _ in range(3)]
        assert loader.builds == 1 and loader.epoch == 3
        resumed = train_loader(image_root, label_root, batch_size=4, seed=9, start_epoch=2)
        replay = list(resumed)
        assert len(replay) == len(epochs[2]) == 3
        for ours, theirs in zip(epochs[2], replay):
            assert ours.keys() == theirs.keys()
            for name in ours:
                assert torch.equal(ours[name], theirs[name]), name
        # ... and the epochs differ from each other in their augmentation, not only in order.
        first = {int(i): box for i, box in zip(torch.cat([b["indices"] for b in epochs[0]]),
                                                 torch.cat([b["boxes"] for b in epochs[0]]))}
        second = {int(i): box for i, box in zip(torch.cat([b["indices"] for b in epochs[1]]),
                                                  torch.cat([b["boxes"] for b in epochs[1]]))}
        assert all(not torch.equal(first[i], second[i]) for i in first)


class RecyclingIterator:
    """Stands for DALI recycling a host buffer once it is released: after the loader has taken a
    batch, the per-sample host buffers it came in are overwritten, as the next batch would be."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        for outputs in self.inner:
            yield outputs
            for name in HOST_METADATA:
                if name in outputs[0]:
                    outputs[0][name].fill_(-7)


class TestHostOutputs:
    def test_per_sample_outputs_are_owned_copies(self, dataset):
        # A GPU loader's asynchronous copies read these after DALI may have moved on.
        image_root, label_root, _ = dataset
        loader = train_loader(image_root, label_root, batch_size=4, seed=3)
        loader._iterator = RecyclingIterator(loader._iterator)
        kept = [(batch, {name: batch[name].clone() for name in HOST_METADATA}) for batch in loader]
        assert len(kept) == 3
        for batch, copies in kept:
            for name in HOST_METADATA:
                assert torch.equal(batch[name], copies[name]), name
        assert sorted(torch.cat([batch["indices"] for batch, _ in kept]).tolist()) == list(range(12))

    def test_val_loader_per_sample_outputs_are_owned_copies(self, dataset):
        image_root, _, _ = dataset
        loader = build_val_loader(Dataset(image_root, num_classes=NUM_CLASSES), batch_size=5, runtime=RUNTIME,
                                  transform=ValTransform(image_size=32))
        loader._iterator = RecyclingIterator(loader._iterator)
        kept = [(batch, batch["labels"].clone(), batch["indices"].clone()) for batch in loader]
        assert all(torch.equal(b["labels"], labels) and torch.equal(b["indices"], indices)
                   for b, labels, indices in kept)

    def test_cpu_images_and_targets_kept_across_batches_stay_as_they_were(self, dataset):
        # A CPU loader hands DALI's own images and targets over; DALI keeps a buffer while a
        # tensor refers to it.
        image_root, label_root, _ = dataset
        loader = train_loader(image_root, label_root, batch_size=2, seed=3)
        kept = [(batch, {name: tensor.clone() for name, tensor in batch.items()}) for batch in loader]
        assert len(kept) == 6
        for batch, copies in kept:
            for name in batch:
                assert torch.equal(batch[name], copies[name]), name


@pytest.mark.gpu
class TestGpuLoader:
    def test_host_outputs_reach_the_gpu_as_they_were_made(self, dataset):
        # The GPU is kept busy after every batch, so each batch's copies run late, after DALI has
        # moved on to the next one: they must still carry their own batch's values.
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
        image_root, _, _ = dataset
        runtime = dict(num_threads=1, py_workers=1, start_method="spawn")
        cpu = [{name: batch[name].clone() for name in HOST_METADATA}
               for batch in train_loader(image_root, batch_size=2, seed=3, runtime=Runtime(**runtime))]
        gpu = []
        for batch in train_loader(image_root, batch_size=2, seed=3, runtime=Runtime(device="cuda", **runtime)):
            torch.cuda._sleep(50_000_000)  # cycles of queued GPU work
            gpu.append(batch)
        torch.cuda.synchronize()
        assert len(gpu) == len(cpu) == 6
        for ours, theirs in zip(gpu, cpu):
            for name in HOST_METADATA:
                assert ours[name].is_cuda and torch.equal(ours[name].cpu(), theirs[name]), name


class TestBadSamples:
    def test_truncated_image_fails_naming_the_file(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        bad = image_root / "c1" / "img0.JPEG"
        bad.write_bytes(bad.read_bytes()[:150])
        loader = train_loader(image_root, batch_size=4)
        with pytest.raises(Exception, match=r"c1/img0.JPEG: truncated JPEG"):
            list(loader)
        # The start-up sample of strict decodes finds it before any pipeline runs.
        with pytest.raises(BadSampleError, match=r"pre-flight decode of 8 sampled images.*c1/img0.JPEG: truncated JPEG"):
            train_loader(image_root, batch_size=4, preflight_decodes=64)
        skipped = train_loader(image_root, batch_size=4, preflight_decodes=64, on_bad_sample="skip")
        assert len(skipped.source.listing) == 7

    @pytest.mark.parametrize("world_size", [1, 2])
    def test_skip_keeps_epoch_length_and_counts(self, tmp_path, world_size):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        (image_root / "c0" / "img3.JPEG").write_bytes(b"")
        lengths, substituted, seen = set(), 0, []
        for rank in range(world_size):
            loader = train_loader(image_root, batch_size=2, rank=rank, world_size=world_size, on_bad_sample="skip")
            indices = indices_of_epoch(loader)
            lengths.add(len(indices))
            substituted += loader.substituted
            seen += indices
        assert lengths == {8 // world_size} and substituted == 1
        assert 3 not in seen and seen.count(4) == 2  # sample 4 stood in for the empty sample 3


class TestValLoader:
    @pytest.mark.parametrize("world_size,batch_size", [(1, 5), (2, 4), (3, 2)])
    def test_every_sample_once_with_a_mask(self, dataset, world_size, batch_size):
        image_root, _, _ = dataset
        seen, lengths = [], set()
        for rank in range(world_size):
            loader = build_val_loader(Dataset(image_root, num_classes=NUM_CLASSES), batch_size=batch_size, rank=rank,
                                      world_size=world_size, transform=ValTransform(image_size=32), runtime=RUNTIME)
            batches = list(loader)
            lengths.add(len(batches))
            assert len(batches) == len(loader)
            for batch in batches:
                assert set(batch) == {"images", "labels", "indices", "valid"}
                assert torch.equal(batch["valid"], batch["indices"] >= 0)
                assert torch.all(batch["labels"][~batch["valid"]] == -1)
                seen += batch["indices"][batch["valid"]].tolist()
        assert len(lengths) == 1 and sorted(seen) == list(range(12))
