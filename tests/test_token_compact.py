"""Compact token targets from the native operator (``compact=True``): pool_labels and fn.label_pool
in a CPU pipeline against the dense output of the same operator bit for bit and against the Python
reference (which classes, what values); the slots (M) and their refusals; the bytes per batch at
S = 14, k = 5; the loader's compact batch keys, the loss on them, compact CutMix against the dense
mix, and a tiny train.py run compact against dense."""
import json
import math

import numpy as np
import pytest
import torch

import train
from conftest import CLASSES
from relabel_dali.data.loader import build_train_loader
from relabel_dali.data.settings import Dataset, Labels, Runtime, TrainAugment
from relabel_dali.ops.build import load_operators
from relabel_dali.ops.compact import CompactTargets, mix
from relabel_dali.ops.pooling import pool_labels
from relabel_dali.ops.reference import random_boxes, random_topk_maps
from relabel_dali.ops.token_reference import compact_token_targets, object_topk_maps, pool_tokens_reference
from relabel_dali.train.cutmix import cutmix_batch_tokens
from relabel_dali.train.losses import smooth_targets, token_label_loss
from test_token_training import dense_loss, token_argv, token_tiny  # noqa: F401 (a fixture)

C = 1000
EDGE_BOXES = torch.tensor([
    [0.0, 0.0, 1.0, 1.0],      # the whole image
    [0.3, 0.0, 0.31, 1.0],     # thinner than a cell
    [0.0, 0.6, 1.0, 0.605],
    [0.99, 0.99, 1.0, 1.0],    # a corner
    [0.0, 0.0, 0.02, 0.02],
    [0.7, 0.2, 1.0, 0.9],      # touching a border
])


def maps(n, k, size, num_classes, seed, objects=True):
    g = torch.Generator().manual_seed(seed)
    if objects:
        scores, ids = object_topk_maps(n, k, size, num_classes, g, objects=2, distractors=max(k, 4))
    else:
        scores, ids = random_topk_maps(n, k, size, size, num_classes, g)
    boxes = torch.cat([EDGE_BOXES, random_boxes(n, g)])[:n]
    return scores, ids, boxes, torch.arange(n) % 2 == 1  # both flips


def assert_compact_is_dense(compact: CompactTargets, dense: torch.Tensor, num_classes: int):
    """The compact form holds the dense targets exactly: values bit for bit at their ids, rest the
    dense value of every class not among them (0 where none is left), ids ascending and distinct,
    padding -1 with value 0."""
    ids, values, rest = compact.ids, compact.values, compact.rest
    assert ids.dtype == torch.int32 and values.dtype == rest.dtype == torch.float32
    present = ids >= 0
    dense_at_ids = dense.gather(-1, ids.clamp(min=0).long())
    assert torch.equal(values[present].view(torch.int32), dense_at_ids[present].view(torch.int32))
    assert torch.all(values[~present] == 0)
    real = torch.where(present, ids, num_classes + torch.arange(ids.shape[-1], dtype=torch.int32))
    assert torch.all(real[..., 1:] > real[..., :-1])  # ascending, distinct, the padding after
    slots = torch.where(present, ids.long(), num_classes)  # the padding to a spare column
    absent = torch.ones(*dense.shape[:-1], num_classes + 1, dtype=torch.bool).scatter_(-1, slots, False)
    absent = absent[..., :num_classes]
    any_absent = absent.any(-1)
    first_absent = absent.to(torch.uint8).argmax(-1, keepdim=True)
    assert torch.equal(rest[any_absent], dense.gather(-1, first_absent).squeeze(-1)[any_absent])
    assert torch.all(rest[~any_absent] == 0)
    # and every class not held takes rest: the dense targets back bit for bit
    assert torch.equal(compact.to_dense(num_classes), dense)


# ---- pool_labels ---------------------------------------------------------------------------------
class TestPoolLabelsCompact:
    @pytest.mark.parametrize("k", [1, 5])
    @pytest.mark.parametrize("size", [1, 7, 14])
    def test_softmax_is_the_dense_output_and_the_references_classes(self, size, k):
        scores, ids, boxes, mirror = maps(10, k, 15, C, seed=size * 10 + k)
        dense = pool_labels(scores, ids, boxes, C, output_size=size, mirror=mirror)
        compact = pool_labels(scores, ids, boxes, C, output_size=size, mirror=mirror, compact=True)
        assert compact.ids.shape[:2] == compact.rest.shape == (10, size * size)
        assert_compact_is_dense(compact, dense, C)
        # an independent reference: the classes each token's window touches (Python, roi_align of
        # ones), M the most any token touches, and the values of its softmax
        reference = compact_token_targets(scores, ids, boxes, mirror, size, C)
        assert torch.equal(compact.ids, reference.ids)
        torch.testing.assert_close(compact.values, reference.values, rtol=4e-6, atol=1e-6)
        torch.testing.assert_close(compact.rest, reference.rest, rtol=1e-5, atol=0)

    def test_random_maps_uint8_scores_and_few_classes(self):
        """Random maps of 12 classes (many tokens hold every class: rest 0) with uint8 scores."""
        scores, ids, boxes, mirror = maps(8, 5, 12, 12, seed=3, objects=False)
        q = (scores * 255).round().to(torch.uint8)
        scale, offset = torch.full((8,), 1 / 255), torch.linspace(-0.1, 0.1, 8)
        dense = pool_labels(q, ids, boxes, 12, scale=scale, offset=offset, output_size=7, mirror=mirror)
        compact = pool_labels(q, ids, boxes, 12, scale=scale, offset=offset, output_size=7, mirror=mirror,
                              compact=True)
        assert_compact_is_dense(compact, dense, 12)
        assert bool((compact.rest == 0).any()) and int(compact.ids.shape[-1]) == 12

    @pytest.mark.parametrize("mode", ["argmax", "global_argmax"])
    def test_argmax_holds_the_one_class(self, mode):
        scores, ids, boxes, mirror = maps(6, 5, 15, C, seed=4)
        size = 14 if mode == "argmax" else 1
        dense = pool_labels(scores, ids, boxes, C, mode, output_size=size, mirror=mirror)
        compact = pool_labels(scores, ids, boxes, C, mode, output_size=size, mirror=mirror, compact=True)
        assert compact.ids.shape == (6, size * size, 1)
        assert torch.equal(compact.ids[..., 0].long(), dense.argmax(-1))
        assert torch.all(compact.values == 1) and torch.all(compact.rest == 0)
        assert torch.equal(compact.to_dense(C), dense)

    def test_slots(self):
        scores, ids, boxes, mirror = maps(6, 5, 15, C, seed=5)
        auto = pool_labels(scores, ids, boxes, C, output_size=7, mirror=mirror, compact=True)
        m = auto.ids.shape[-1]
        wide = pool_labels(scores, ids, boxes, C, output_size=7, mirror=mirror, compact=True, compact_slots=m + 3)
        assert wide.ids.shape[-1] == m + 3
        assert torch.all(wide.ids[..., m:] == -1) and torch.all(wide.values[..., m:] == 0)
        assert torch.equal(wide.ids[..., :m], auto.ids) and torch.equal(wide.values[..., :m], auto.values)
        assert torch.equal(wide.rest, auto.rest)
        # the first token (lowest sample, then lowest token) needing more than the slots is named
        b, t = (int(i) for i in torch.nonzero((auto.ids >= 0).sum(-1) == m)[0])
        message = (f"sample {b}, token {t} \\(row {t // 7}, column {t % 7}\\): {m} classes, more than the "
                   f"{m - 1} compact slots")
        with pytest.raises(ValueError, match=message):
            pool_labels(scores, ids, boxes, C, output_size=7, mirror=mirror, compact=True, compact_slots=m - 1)
        with pytest.raises(ValueError, match=f"sample {b}, token {t}: {m} classes, more than the {m - 1} compact"):
            pool_tokens_reference(scores, ids, boxes, mirror, 7, C, compact=True, compact_slots=m - 1)
        reference = pool_tokens_reference(scores, ids, boxes, mirror, 7, C, compact=True, compact_slots=m + 3)
        assert torch.equal(reference.ids, wide.ids)

    def test_refusals(self):
        scores, ids, boxes, mirror = maps(2, 5, 15, C, seed=6)
        with pytest.raises(ValueError, match="compact=True needs token targets: pass output_size"):
            pool_labels(scores, ids, boxes, C, compact=True)
        with pytest.raises(ValueError, match="compact_slots 4 needs compact=True"):
            pool_labels(scores, ids, boxes, C, output_size=2, compact_slots=4)
        with pytest.raises(ValueError, match="compact_slots 0: expected None .* or an int >= 1"):
            pool_labels(scores, ids, boxes, C, output_size=2, compact=True, compact_slots=0)
        with pytest.raises(ValueError, match="compact=True pools on the CPU only .* got tensors on meta"):
            pool_labels(scores.to("meta"), ids.to("meta"), boxes.to("meta"), C, output_size=2, compact=True)
        with pytest.raises(ValueError, match="sample 1: box"):
            pool_labels(scores, ids, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.5, 1.0]]), C, output_size=2,
                        compact=True)


# ---- fn.label_pool ------------------------------------------------------------------------------
def run_compact_pipeline(scores, ids, boxes, mirror, batch_size, **op_args):
    """fn.label_pool(compact=True) on the CPU in batches of ``batch_size``: per batch its (ids, values,
    rest) as torch tensors (M may differ between batches)."""
    load_operators()
    from nvidia.dali import fn, pipeline_def

    n = len(scores)
    samples = (scores.numpy(), ids.numpy().astype(np.uint16), boxes.numpy(), mirror.numpy().astype(np.int32))

    def batches():
        for start in range(0, n, batch_size):
            yield tuple([np.ascontiguousarray(a[i]) for i in range(start, start + batch_size)] for a in samples)

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        s, i, b, m = fn.external_source(source=batches, num_outputs=4, cycle="raise")
        return tuple(fn.label_pool(s, i, b, mirror=m, compact=True, **op_args))

    pipe = pipeline()
    pipe.build()
    results = []
    for _ in range(n // batch_size):
        results.append([torch.from_numpy(np.stack([np.array(t) for t in out])) for out in pipe.run()])
    return results


class TestOperatorCompact:
    @pytest.mark.parametrize("k", [1, 5])
    def test_equals_pool_labels_batch_by_batch(self, k):
        scores, ids, boxes, mirror = maps(12, k, 15, C, seed=20 + k)
        for size in (1, 7, 14):
            got = run_compact_pipeline(scores, ids, boxes, mirror, 6, num_classes=C, output_size=size)
            for part, (g_ids, g_values, g_rest) in zip((slice(0, 6), slice(6, 12)), got):
                expected = pool_labels(scores[part], ids[part], boxes[part], C, output_size=size,
                                       mirror=mirror[part], compact=True)
                assert torch.equal(g_ids, expected.ids)  # M: the most any token of this batch needs
                assert torch.equal(g_values.view(torch.int32), expected.values.view(torch.int32))
                assert torch.equal(g_rest.view(torch.int32), expected.rest.view(torch.int32))
                dense = pool_labels(scores[part], ids[part], boxes[part], C, output_size=size, mirror=mirror[part])
                assert_compact_is_dense(CompactTargets(g_ids, g_values, g_rest), dense, C)

    def test_fixed_slots_and_the_error_naming_the_token(self):
        scores, ids, boxes, mirror = maps(4, 5, 15, C, seed=30)
        expected = pool_labels(scores, ids, boxes, C, output_size=7, mirror=mirror, compact=True, compact_slots=40)
        ((g_ids, g_values, g_rest),) = run_compact_pipeline(scores, ids, boxes, mirror, 4, num_classes=C,
                                                            output_size=7, compact_slots=40)
        assert g_ids.shape == (4, 49, 40)
        assert torch.equal(g_ids, expected.ids) and torch.equal(g_values, expected.values)
        m = int((expected.ids >= 0).sum(-1).max())
        count = (expected.ids >= 0).sum(-1)
        b, t = (int(i) for i in torch.nonzero(count > m - 1)[0])
        with pytest.raises(RuntimeError, match=f"sample {b}, token {t} \\(row {t // 7}, column {t % 7}\\) touches "
                                               f"{m} classes, more than compact_slots = {m - 1}"):
            run_compact_pipeline(scores, ids, boxes, mirror, 4, num_classes=C, output_size=7, compact_slots=m - 1)

    @pytest.mark.parametrize("args,message", [
        (dict(compact_slots=3), "compact_slots = 3 needs compact=True"),
        (dict(compact=True), "compact=True needs token targets: set output_size >= 1"),
    ])
    def test_refusals_at_graph_build(self, args, message):
        load_operators()
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(batch_size=2, num_threads=1, device_id=None)
        def pipeline():
            s, i, b = fn.external_source(source=lambda: None, num_outputs=3)
            out = fn.label_pool(s, i, b, **args)
            return tuple(out) if isinstance(out, list) else out

        with pytest.raises(RuntimeError, match=message):
            pipeline().build()

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU backend's refusal needs a GPU to build on")
    def test_gpu_backend_refuses_compact(self):
        load_operators()
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(batch_size=2, num_threads=1, device_id=0)
        def pipeline():
            s, i, b = fn.external_source(source=lambda: None, num_outputs=3)
            return tuple(fn.label_pool(s.gpu(), i.gpu(), b, output_size=2, compact=True, device="gpu"))

        with pytest.raises(RuntimeError, match="compact=True is implemented on the CPU backend only"):
            pipeline().build()


# ---- bytes per batch -----------------------------------------------------------------------------
def random_resized_crops(n, generator):
    """RandomResizedCrop's boxes: area 8-100 % of the image, aspect ratio 3/4 to 4/3, clipped."""
    area = 0.08 + 0.92 * torch.rand(n, generator=generator)
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, generator=generator))
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    x0, y0 = (1 - w) * torch.rand(n, generator=generator), (1 - h) * torch.rand(n, generator=generator)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1).clamp(0, 1)


def test_bytes_per_batch_at_14_tokens_and_top5(capsys):
    """The documented case: batch 128, S = 14, k = 5, real-looking 15 x 15 maps (object_topk_maps),
    1000 classes, random-resized crops, half mirrored: the compact outputs are at most 10 % of the
    dense [128, 196, 1000] float32."""
    g = torch.Generator().manual_seed(14)
    scores, ids = object_topk_maps(128, 5, 15, C, g)
    boxes, mirror = random_resized_crops(128, g), torch.rand(128, generator=g) < 0.5
    compact = pool_labels(scores, ids, boxes, C, output_size=14, mirror=mirror, compact=True)
    dense_bytes = 128 * 196 * C * 4
    fraction = compact.nbytes / dense_bytes
    with capsys.disabled():
        print(f"\ncompact token targets from the operator: M = {compact.ids.shape[-1]}, {compact.nbytes:,} bytes vs "
              f"{dense_bytes:,} dense ({fraction:.2%}); {float((compact.ids >= 0).sum(-1).float().mean()):.1f} "
              f"classes per token on average")
    assert compact.nbytes == 128 * 196 * (8 * compact.ids.shape[-1] + 4)
    assert fraction <= 0.10


# ---- CutMix and smoothing on compact targets -----------------------------------------------------
class TestCompactMix:
    @pytest.mark.parametrize("size,side", [(4, 32), (7, 56), (14, 224)])
    def test_cutmix_equals_the_dense_mix_bit_for_bit(self, size, side):
        scores, ids, boxes, mirror = maps(6, 5, 15, C, seed=size)
        dense = pool_labels(scores, ids, boxes, C, output_size=size, mirror=mirror)
        compact = pool_labels(scores, ids, boxes, C, output_size=size, mirror=mirror, compact=True)
        g = torch.Generator().manual_seed(size)
        images, targets = torch.randn(6, 3, side, side, generator=g), torch.softmax(torch.randn(6, C, generator=g), 1)
        mixed_somewhere = False
        for seed in range(3):
            a = cutmix_batch_tokens(images.clone(), targets, dense, prob=0.8,
                                    generator=torch.Generator().manual_seed(seed))
            b = cutmix_batch_tokens(images.clone(), targets, compact, prob=0.8,
                                    generator=torch.Generator().manual_seed(seed))
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[3] == b[3]
            assert torch.equal(b[2].to_dense(C), a[2])
            mixed_somewhere |= a[3] < 1.0
        assert mixed_somewhere

    def test_mix_holds_the_union_only_where_both_count(self):
        a = CompactTargets(torch.tensor([[[1, 4, -1], [2, -1, -1], [0, 3, -1]]], dtype=torch.int32),
                           torch.tensor([[[0.5, 0.25, 0.0], [0.5, 0.0, 0.0], [0.125, 0.5, 0.0]]]),
                           torch.tensor([[0.0625, 0.125, 0.09375]]))
        b = CompactTargets(torch.tensor([[[4, 5], [3, -1], [3, 6]]], dtype=torch.int32),
                           torch.tensor([[[0.5, 0.25], [0.75, 0.0], [0.25, 0.5]]]),
                           torch.tensor([[0.0625, 0.0625, 0.0625]]))
        share = torch.tensor([[0.25, 0.0, 1.0]])
        mixed = mix(a, b, share)
        assert mixed.ids.tolist() == [[[1, 4, 5], [2, -1, -1], [3, 6, -1]]]
        # token 0: 1 in a only, 4 in both, 5 in b only
        assert mixed.values[0, 0].tolist() == [0.75 * 0.5 + 0.25 * 0.0625, 0.75 * 0.25 + 0.25 * 0.5,
                                               0.75 * 0.0625 + 0.25 * 0.25]
        assert mixed.rest.tolist() == [[0.0625, 0.125, 0.0625]]
        dense = (1 - share.unsqueeze(-1)) * a.to_dense(8) + share.unsqueeze(-1) * b.to_dense(8)
        assert torch.equal(mixed.to_dense(8), dense)

    def test_smoothing_equals_the_dense_smoothing(self):
        scores, ids, boxes, mirror = maps(4, 5, 15, C, seed=40)
        dense = pool_labels(scores, ids, boxes, C, output_size=7, mirror=mirror)
        compact = pool_labels(scores, ids, boxes, C, output_size=7, mirror=mirror, compact=True)
        smoothed = smooth_targets(compact, 0.1, num_classes=C)
        assert torch.equal(smoothed.to_dense(C), smooth_targets(dense, 0.1))
        assert torch.all(smoothed.values[compact.ids < 0] == 0)
        with pytest.raises(ValueError, match="compact targets need num_classes"):
            smooth_targets(compact, 0.1)

    def test_bad_compact_token_shape_is_refused(self):
        compact = CompactTargets(torch.zeros(2, 15, 3, dtype=torch.int32), torch.zeros(2, 15, 3), torch.zeros(2, 15))
        with pytest.raises(ValueError, match=r"token_targets: expected \[B=2, S\*S, m\] \(compact\), got shape "
                                             r"\(2, 15, 3\)"):
            cutmix_batch_tokens(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4), compact, generator=torch.Generator())


# ---- the loader and train.py ---------------------------------------------------------------------
class TestLoaderAndTraining:
    def test_compact_batch_keys_hold_the_dense_targets_and_give_the_same_loss(self, token_tiny):
        def first_batch(compact):
            loader = build_train_loader(Dataset(token_tiny / "train", num_classes=3), batch_size=8,
                                        labels=Labels(token_tiny / "labels", token_size=4, token_compact=compact),
                                        augment=TrainAugment(image_size=32),
                                        runtime=Runtime(num_threads=1, py_workers=1), seed=3)
            try:
                return next(iter(loader))
            finally:
                loader.close()

        dense, compact = first_batch(False), first_batch(True)
        assert set(compact) == set(dense) - {"token_targets"} | {"token_ids", "token_values", "token_rest"}
        for name in set(dense) - {"token_targets"}:  # images, crop targets, boxes, flips: unchanged
            assert torch.equal(dense[name], compact[name]), name
        m = compact["token_ids"].shape[-1]
        assert compact["token_ids"].shape == compact["token_values"].shape == (8, 16, m)
        assert compact["token_rest"].shape == (8, 16) and compact["token_ids"].dtype == torch.int32
        targets = CompactTargets(compact["token_ids"], compact["token_values"], compact["token_rest"])
        assert_compact_is_dense(targets, dense["token_targets"], len(CLASSES))
        g = torch.Generator().manual_seed(0)
        logits, token_logits = 3 * torch.randn(8, 3, generator=g), 3 * torch.randn(8, 16, 3, generator=g)
        expected = dense_loss(logits, token_logits, dense["targets"], dense["token_targets"], 0.5)
        got = float(token_label_loss(logits, token_logits, compact["targets"], targets, 0.5))
        assert got == pytest.approx(expected, rel=1e-5)

    def test_train_compact_equals_dense(self, token_tiny, tmp_path, monkeypatch):
        """train.py on token labels with CutMix and label smoothing, compact and dense: the same
        losses and weights (the two losses differ in float rounding only)."""
        from relabel_dali.train import engine

        results, kinds = {}, []
        original = engine.token_targets_of

        def recorded(batch, device):
            tokens = original(batch, device)
            kinds.append(type(tokens).__name__)
            return tokens

        monkeypatch.setattr(engine, "token_targets_of", recorded)
        for compact in ("true", "false"):
            out = tmp_path / compact
            argv = token_argv(token_tiny, out, "--data.relabel.token_compact", compact, "--optim.epochs", "1",
                              "--optim.label_smoothing", "0.1")
            kinds.clear()
            assert train.main(argv) == 0
            assert kinds and set(kinds) == {"CompactTargets" if compact == "true" else "Tensor"}
            results[compact] = (json.loads((out / "metrics.json").read_text())["train"]["loss"],
                                torch.load(out / "checkpoint-last.pth", weights_only=False)["model"])
        (loss_c, model_c), (loss_d, model_d) = results["true"], results["false"]
        assert loss_c == pytest.approx(loss_d, rel=1e-5)
        assert model_c.keys() == model_d.keys()
        for name in model_c:
            torch.testing.assert_close(model_c[name], model_d[name], rtol=1e-4, atol=1e-5, msg=name)
