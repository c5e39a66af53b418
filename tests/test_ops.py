"""The LabelPool DALI operator inside pipelines, and the build cache of relabel_dali.ops.build."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import run_label_pool as run_pipeline
from relabel_dali.store import format as fmt
from relabel_dali.ops.build import build_info, load_operators
from relabel_dali.ops.pooling import pool_labels
from relabel_dali.ops.reference import MODES, random_boxes, random_topk_maps, reference_pool

TOL = 1e-6


def run_label_pool(scores, class_ids, boxes, batch_size, device="cpu", scale=None, offset=None, **op_args):
    """fn.label_pool on numpy batches, with per-sample scale and offset for quantized scores; [N, C]."""
    quantized = {} if scale is None else {"scale": np.asarray(scale, np.float32),
                                          "offset": np.asarray(offset, np.float32)}
    return run_pipeline(scores, class_ids, boxes, batch_size, device, quantized, **op_args)


def make_inputs(n, seed, num_classes, shape=(5, 15, 15)):
    g = torch.Generator().manual_seed(seed)
    scores, class_ids = random_topk_maps(n, *shape, num_classes, g)
    return scores, class_ids.to(torch.int32), random_boxes(n, g)


class TestLabelPoolOperatorCpu:
    @pytest.mark.parametrize("mode", MODES)
    def test_matches_pool_labels_and_reference(self, mode):
        scores, class_ids, boxes = make_inputs(1024, 3, 500)
        got = run_label_pool(scores.numpy(), class_ids.numpy().astype(np.uint16), boxes.numpy(), 256,
                             num_classes=500, mode=mode)
        native = pool_labels(scores, class_ids, boxes, 500, mode).numpy()
        np.testing.assert_array_equal(got, native)
        expected = reference_pool(scores, class_ids, boxes, 500, mode)
        if "argmax" in mode:
            # The op equals pool_labels exactly; pool_labels' argmax parity (near-ties) is tested there.
            assert (got.argmax(1) == expected.numpy().argmax(1)).mean() > 0.99
        else:
            np.testing.assert_allclose(got, expected.numpy(), atol=TOL, rtol=0)

    def test_default_arguments_are_softmax_over_1000(self):
        scores, class_ids, boxes = make_inputs(64, 5, 1000)
        got = run_label_pool(scores.numpy(), class_ids.numpy().astype(np.uint16), boxes.numpy(), 64)
        assert got.shape == (64, 1000)
        np.testing.assert_allclose(got, reference_pool(scores, class_ids, boxes).numpy(), atol=TOL, rtol=0)

    @pytest.mark.parametrize("mode", ["softmax", "global_argmax"])
    def test_float16_scores(self, mode):
        scores, class_ids, boxes = make_inputs(128, 7, 300)
        half = scores.to(torch.float16)
        got = run_label_pool(half.numpy(), class_ids.numpy().astype(np.uint16), boxes.numpy(), 64,
                             num_classes=300, mode=mode)
        np.testing.assert_array_equal(got, pool_labels(half, class_ids, boxes, 300, mode).numpy())
        if mode == "softmax":
            expected = reference_pool(half.float(), class_ids, boxes, 300, mode).numpy()
            np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)

    def test_uint8_scores_with_per_sample_scale_and_offset(self):
        scores, class_ids, boxes = make_inputs(128, 9, 300)
        encoded = [fmt.encode_scores(s, 3) for s in (scores * 8 - 3).numpy()]
        stored = np.stack([e[0] for e in encoded])
        scale = np.array([e[1] for e in encoded], np.float32)
        offset = np.array([e[2] for e in encoded], np.float32)
        decoded = torch.from_numpy(np.stack([fmt.decode_scores(q, a, b) for q, a, b in encoded]))
        got = run_label_pool(stored, class_ids.numpy().astype(np.uint16), boxes.numpy(), 64, scale=scale,
                             offset=offset, num_classes=300)
        np.testing.assert_allclose(got, reference_pool(decoded, class_ids, boxes, 300).numpy(), atol=TOL, rtol=0)

    def test_class_ids_beyond_num_classes_are_ignored(self):
        # As on the GPU, which cannot raise: such an entry contributes nothing, like one of score 0
        # (pool_labels and the packer reject these maps before they get here).
        scores, class_ids, boxes = make_inputs(64, 19, 100)
        bad = torch.rand(class_ids.shape, generator=torch.Generator().manual_seed(0)) < 0.05
        ids = class_ids.masked_fill(bad, 100).numpy().astype(np.uint16)
        ids[:32][bad[:32].numpy()] = 65535
        got = run_label_pool(scores.numpy(), ids, boxes.numpy(), 64, num_classes=100)
        expected = pool_labels(scores.masked_fill(bad, 0.0), class_ids.masked_fill(bad, 0), boxes, 100).numpy()
        np.testing.assert_array_equal(got, expected)

    def test_mixed_map_sizes_in_one_batch(self):
        parts = [make_inputs(2, 11 + i, 100, shape) for i, shape in enumerate([(5, 15, 15), (3, 7, 12)])]
        scores = [s.numpy()[j] for s, _, _ in parts for j in range(2)]
        class_ids = [c.numpy().astype(np.uint16)[j] for _, c, _ in parts for j in range(2)]
        boxes = [b.numpy()[j] for _, _, b in parts for j in range(2)]
        got = run_label_pool(scores, class_ids, boxes, 4, num_classes=100)
        for j, (s, c, b) in enumerate(zip(scores, class_ids, boxes)):
            expected = reference_pool(torch.from_numpy(s)[None], torch.from_numpy(c.astype(np.int64))[None],
                                      torch.from_numpy(b)[None], 100)
            np.testing.assert_allclose(got[j], expected[0].numpy(), atol=TOL, rtol=0)


class TestLabelPoolOperatorErrors:
    def setup_method(self):
        scores, class_ids, boxes = make_inputs(4, 13, 100)
        self.scores, self.class_ids, self.boxes = scores.numpy(), class_ids.numpy().astype(np.uint16), boxes.numpy()

    @pytest.mark.parametrize("box, problem", [
        ((0.5, 0.1, 0.5, 0.9), "degenerate"),
        ((0.1, 0.9, 0.5, 0.2), "inverted"),
        ((float("nan"), 0.1, 0.5, 0.9), "NaN"),
        ((0.1, 0.1, 1.2, 0.9), "outside"),
    ])
    def test_bad_box(self, box, problem):
        self.boxes[2] = box
        with pytest.raises(RuntimeError, match=rf"LabelPool: sample 2: box \(x0, y0, x1, y1\) = .*{problem}"):
            run_label_pool(self.scores, self.class_ids, self.boxes, 4, num_classes=100)

    def test_shape_mismatch(self):
        class_ids = [c[:, :, :14].copy() if i == 1 else c for i, c in enumerate(self.class_ids)]
        with pytest.raises(RuntimeError, match=r"sample 1: class_ids shape .* differs from scores shape"):
            run_label_pool(list(self.scores), class_ids, self.boxes, 4, num_classes=100)

    def test_wrong_class_id_dtype(self):
        with pytest.raises(RuntimeError, match=r"class_ids \(input 1\) must be uint16"):
            run_label_pool(self.scores, self.class_ids.astype(np.int32), self.boxes, 4, num_classes=100)

    def test_wrong_box_shape(self):
        with pytest.raises(RuntimeError, match=r"sample 0: box shape .*expected \[4\]"):
            run_label_pool(self.scores, self.class_ids, self.boxes[:, :3].copy(), 4, num_classes=100)

    def test_unknown_mode(self):
        with pytest.raises(RuntimeError, match=r"mode \"mean\" is not one of"):
            run_label_pool(self.scores, self.class_ids, self.boxes, 4, num_classes=100, mode="mean")


@pytest.mark.gpu
class TestLabelPoolOperatorGpu:
    @pytest.mark.parametrize("mode", MODES)
    def test_gpu_equals_cpu_bit_for_bit(self, mode):
        # Exact per-class sums and shared arithmetic (docs/OPERATOR.md): no tolerance, no near-tie caveat.
        scores, class_ids, boxes = make_inputs(512, 17, 1000)
        args = (scores.numpy(), class_ids.numpy().astype(np.uint16), boxes.numpy(), 256)
        cpu = run_label_pool(*args, mode=mode)
        gpu = run_label_pool(*args, device="gpu", mode=mode)
        np.testing.assert_array_equal(gpu.view(np.int32), cpu.view(np.int32))
        np.testing.assert_array_equal(run_label_pool(*args, device="gpu", mode=mode).view(np.int32),
                                      gpu.view(np.int32))

    def test_gpu_ignores_class_ids_beyond_num_classes_as_the_cpu_does(self):
        scores, class_ids, boxes = make_inputs(64, 19, 100)
        bad = torch.rand(class_ids.shape, generator=torch.Generator().manual_seed(0)) < 0.05
        args = (scores.numpy(), class_ids.masked_fill(bad, 100).numpy().astype(np.uint16), boxes.numpy(), 64)
        np.testing.assert_array_equal(run_label_pool(*args, device="gpu", num_classes=100).view(np.int32),
                                      run_label_pool(*args, num_classes=100).view(np.int32))


BUILD_SCRIPT = textwrap.dedent("""
    import json, sys
    from relabel_dali.ops import build as ops
    path = ops.build_plugin()
    print(json.dumps({"path": str(path), "built": ops.build_info()["built_now"]}))
""")


class TestBuildCache:
    def _spawn(self, cache):
        env = {**os.environ, "RELABEL_DALI_CACHE": str(cache), "RELABEL_DALI_NO_CUDA": "1"}
        return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def test_concurrent_builds_make_one_library_then_cache_hits(self, tmp_path):
        import json

        first = [self._spawn(tmp_path) for _ in range(2)]
        results = []
        for process in first:
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        assert results[0]["path"] == results[1]["path"]
        assert sorted(r["built"]["label_pool_dali" + build_info()["dali_version"]] for r in results) == [False, True]
        assert [p.name for p in tmp_path.glob("*.so")] == [os.path.basename(results[0]["path"])]
        assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no temp build folder left behind

        again = self._spawn(tmp_path)
        stdout, stderr = again.communicate(timeout=300)
        assert again.returncode == 0, stderr
        assert json.loads(stdout.strip().splitlines()[-1])["built"] == {"label_pool_dali2.4.0": False}

    def test_the_same_dali_in_another_folder_reuses_the_build(self, tmp_path, monkeypatch):
        """Another virtual environment or clone holding the same DALI release finds the plugin built:
        its cache key names DALI's release, not the folder DALI is unpacked in."""
        import nvidia.dali.sysconfig as sysconfig

        from relabel_dali.ops import build as ops

        built = ops.build_plugin()
        real = str(sysconfig.get_lib_dir())
        elsewhere = tmp_path / "other-venv" / "site-packages" / "nvidia" / "dali"
        elsewhere.parent.mkdir(parents=True)
        elsewhere.symlink_to(real)

        def moved(value):
            return [moved(v) for v in value] if isinstance(value, list) else value.replace(real, str(elsewhere))

        for name in ("get_lib_dir", "get_include_dir", "get_compile_flags", "get_link_flags"):
            monkeypatch.setattr(sysconfig, name, lambda original=getattr(sysconfig, name): moved(original()))
        assert str(elsewhere) in " ".join(ops.dali_build_flags()[0])
        assert ops.build_plugin() == built
        assert ops.build_info()["built_now"]["label_pool_dali" + ops.dali_build_flags()[2]] is False

    def test_another_dali_build_has_its_own_key(self, monkeypatch):
        import nvidia.dali as dali

        from relabel_dali.ops import build as ops

        flags = ops.dali_build_flags()[:2]
        before = ops.dali_key_parts(*flags)
        monkeypatch.setattr(dali, "__git_sha__", "0" * 40)
        assert ops.dali_key_parts(*flags) != before
        monkeypatch.undo()
        assert ops.dali_key_parts(flags[0] + ["-DANOTHER_FLAG"], flags[1]) != before

    def test_bad_arch_list_is_reported(self, monkeypatch):
        from relabel_dali.ops import build as ops

        monkeypatch.setenv("RELABEL_DALI_CUDA_ARCHS", "sm_90")
        with pytest.raises(ops.BuildError, match="RELABEL_DALI_CUDA_ARCHS='sm_90'"):
            ops.cuda_archs()

    @pytest.mark.parametrize("archs, ptx", [(["90"], "90"), (["80", "90"], "90"), (["90", "80"], "90"),
                                            (["100", "90"], "100")])
    def test_machine_code_for_every_arch_and_ptx_for_the_newest(self, archs, ptx):
        from relabel_dali.ops import build as ops

        flags = ops.nvcc_gencode(archs)
        assert sorted(flags) == sorted(f"-gencode=arch=compute_{a},code=sm_{a}" if a != ptx else
                                       f"-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]" for a in archs)

    def test_load_is_idempotent(self):
        from nvidia.dali import fn

        assert load_operators() == load_operators()
        assert hasattr(fn, "label_pool")
        assert build_info()["plugin"] == str(load_operators())
