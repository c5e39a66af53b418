"""The steps that run in a child process of the check (``python -m tools.gpu_check --step NAME``):
each reads the settings the runner wrote and leaves its result in ``WORK/results/NAME.json``."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from tools.gpu_check.profiles import TOLERANCE, StepFailure, StepSkipped
from tools.gpu_check.trainer import train_loop


def nvidia_smi() -> list[dict]:
    """The GPUs nvidia-smi lists (no CUDA context is created), or [] without nvidia-smi or GPUs."""
    fields = ["name", "memory.total", "driver_version", "compute_cap"]
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    rows = [[v.strip() for v in line.split(",")] for line in result.stdout.strip().splitlines() if line.strip()]
    return [dict(zip(["name", "memory_mib", "driver", "compute_capability"], row)) for row in rows]


def child_environment(s: dict) -> dict:
    import importlib.metadata

    import torch

    from relabel_dali.ops import build as ops

    gpus = nvidia_smi()
    dali = [f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")]
    try:  # also where DALI was unpacked onto PYTHONPATH without its package metadata
        import nvidia.dali

        dali.append(f"nvidia.dali {nvidia.dali.__version__} from {Path(nvidia.dali.__file__).parent}")
    except ImportError:
        pass
    nvcc = ops.find_nvcc()
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").is_dir() else None

    def version(find):
        try:
            return ops._short_version(ops.compiler_version(find()))
        except ops.BuildError as error:  # the build step reports it as its failure
            return f"unusable: {error}"

    numbers = {
        "gpus": gpus, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "torch_gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if s["device"] == "cuda" else [],
        "dali": dali or None, "nvcc": version(lambda: nvcc) if nvcc else None, "cxx": version(ops.host_compiler),
        "cuda_archs": os.environ.get("RELABEL_DALI_CUDA_ARCHS"), "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "dev_shm_free_gib": None if shm is None else round(shm.free / 2 ** 30, 2)}
    if s["device"] == "cuda" and not numbers["torch_gpus"]:
        raise StepFailure("--device cuda, but torch finds no GPU" + ("" if gpus else " (nor does nvidia-smi)"))
    return numbers


def child_build(s: dict) -> dict:
    from relabel_dali.ops import build as ops

    nvcc = ops.find_nvcc()
    if s["device"] == "cuda" and nvcc is None:
        raise StepFailure("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): the GPU kernels cannot be built; "
                          "install the CUDA toolkit or set CUDA_HOME")
    numbers = {"nvcc": nvcc, "cuda_archs": ops.cuda_archs() if nvcc else []}
    parts = [("capi", ops.build_capi, "label_pool_capi")]
    if not s["no_dali"]:
        parts.append(("plugin", ops.build_plugin, None))
    for name, build, _ in parts:
        started = time.perf_counter()
        try:
            path = build()
        except ops.BuildError as error:
            raise StepFailure(f"{name}: {error}") from None
        numbers[f"{name}_seconds"] = time.perf_counter() - started
        numbers[f"{name}_path"] = str(path)
    numbers["built_now"] = ops.build_info()["built_now"]  # False: found in the cache
    return numbers


def edge_boxes(h: int, w: int):
    """The whole image, single cells at the corners and the centre, one-cell strips along each border."""
    import torch

    cells = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)]
    boxes = [(0.0, 0.0, 1.0, 1.0)] + [(x / w, y / h, (x + 1) / w, (y + 1) / h) for y, x in cells]
    boxes += [(0.0, 0.0, 1 / w, 1.0), (1 - 1 / w, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1 / h), (0.0, 1 - 1 / h, 1.0, 1.0)]
    return torch.tensor(boxes, dtype=torch.float32)


def stored_scores(scores, dtype: str):
    """(scores as stored, scale, offset, the floats they stand for) for one score dtype."""
    import numpy as np
    import torch

    from relabel_dali.store import format as fmt

    if dtype == "float32":
        return scores, None, None, scores
    if dtype == "float16":
        half = scores.half()
        return half, None, None, half.float()
    encoded = [fmt.encode_scores(sample, fmt.score_dtype_code("uint8")) for sample in scores.numpy()]
    stored = torch.from_numpy(np.stack([q for q, _, _ in encoded]))
    decoded = torch.from_numpy(np.stack([fmt.decode_scores(q, a, b) for q, a, b in encoded]))
    return (stored, torch.tensor([a for _, a, _ in encoded]), torch.tensor([b for _, _, b in encoded]),
            decoded.float())


def constant(value):
    """A source callable without parameters (DALI passes batch information to one that has any)."""
    return lambda: value


def pool_with_operator(scores, class_ids, boxes, mode: str, device: str, scale=None, offset=None):
    """fn.label_pool over one batch in a one-off pipeline (inputs on the GPU for device cuda)."""
    import numpy as np
    import torch

    from relabel_dali.ops.build import load_operators

    load_operators()
    from nvidia.dali import fn, pipeline_def

    arrays = [scores.numpy(), class_ids.numpy().astype(np.uint16), boxes.numpy()]
    if scale is not None:
        arrays += [scale.numpy().astype(np.float32), offset.numpy().astype(np.float32)]

    @pipeline_def(batch_size=len(scores), num_threads=min(4, os.cpu_count() or 1),
                  device_id=0 if device == "cuda" else None, prefetch_queue_depth=1)
    def pipeline():
        inputs = [fn.external_source(source=constant(a), batch=True) for a in arrays]
        s, i, b = inputs[:3]
        if device == "cuda":
            s, i = s.gpu(), i.gpu()
        extra = {"scale": inputs[3], "offset": inputs[4]} if scale is not None else {}
        return fn.label_pool(s, i, b, mode=mode, device="gpu" if device == "cuda" else "cpu", **extra)

    pipe = pipeline()
    pipe.build()
    (out,) = pipe.run()
    if device == "cuda":
        out = out.as_cpu()
    return torch.from_numpy(np.array(out.as_tensor()))


def same_bits(a, b) -> bool:
    """Equal float tensors bit for bit (NaNs included, +0 and -0 told apart)."""
    import torch

    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def child_parity(s: dict) -> dict:
    """Every backend against the literal reference, and the GPU backends against the CPU ones, for
    each mode and score dtype. Argmax modes: only rows whose top two pooled scores are clearly
    apart (reference.clear_top2), where every correct argmax agrees. Determinism: pool_labels runs
    each batch twice on the device, and the GPU's outputs must equal the CPU's bit for bit (the
    kernel's sums are exact, docs/OPERATOR.md)."""
    import torch

    from relabel_dali.ops.pooling import pool_labels
    from relabel_dali.ops.reference import MODES, clear_top2, random_boxes, random_topk_maps, reference_pool

    n, device = s["parity_batch"], s["device"]
    g = torch.Generator().manual_seed(1)
    scores, class_ids = random_topk_maps(n, 5, 15, 15, 1000, g)
    boxes = random_boxes(n, g)
    edges = edge_boxes(15, 15)
    boxes[:len(edges)] = edges
    diffs, clear_fractions, bit_identical = {}, {}, {}
    for dtype in ("float32", "float16", "uint8"):
        stored, scale, offset, floats = stored_scores(scores, dtype)
        soft = {}
        for mode in MODES:  # each softmax mode before its argmax mode
            expected = torch.cat([reference_pool(floats[i:i + 256], class_ids[i:i + 256], boxes[i:i + 256], 1000, mode)
                                  for i in range(0, n, 256)])
            got = {}
            for where in ["cpu", "cuda"] if device == "cuda" else ["cpu"]:
                def to(t):
                    return None if t is None else t.to(where)
                got[f"pool_labels_{where}"] = pool_labels(to(stored), to(class_ids), to(boxes), 1000, mode,
                                                          to(scale), to(offset)).cpu()
                again = pool_labels(to(stored), to(class_ids), to(boxes), 1000, mode, to(scale), to(offset)).cpu()
                bit_identical[f"pool_labels_{where}_twice/{dtype}/{mode}"] = same_bits(again,
                                                                                      got[f"pool_labels_{where}"])
                if not s["no_dali"]:
                    got[f"operator_{where}"] = pool_with_operator(stored, class_ids, boxes, mode, where, scale, offset)
            rows = torch.ones(n, dtype=torch.bool)
            if mode.endswith("argmax"):
                rows = clear_top2(soft[mode.replace("argmax", "softmax")])
                clear_fractions[f"{dtype}/{mode}"] = float(rows.float().mean())
            else:
                soft[mode] = expected
            pairs = [(name, expected) for name in got]
            if device == "cuda":
                pairs += [(f"{kind}_cuda_vs_cpu", got[f"{kind}_cpu"]) for kind in ("pool_labels", "operator")
                          if f"{kind}_cpu" in got]
                for kind in ("pool_labels", "operator"):
                    if f"{kind}_cpu" in got:
                        bit_identical[f"{kind}_cuda_vs_cpu/{dtype}/{mode}"] = same_bits(got[f"{kind}_cuda"],
                                                                                      got[f"{kind}_cpu"])
            for name, against in pairs:
                mine = got[name.replace("_vs_cpu", "")]
                diffs[f"{name}/{dtype}/{mode}"] = float((mine[rows] - against[rows]).abs().max())
    worst = max(diffs, key=diffs.get)
    numbers = {"batch": n, "edge_boxes": len(edges), "tolerance": TOLERANCE, "worst_abs_diff": diffs[worst],
               "worst": worst, "min_clear_fraction_argmax": min(clear_fractions.values()),
               "max_abs_diff": diffs, "clear_fraction_argmax": clear_fractions,
               "bit_identical": bit_identical}
    bad = [f"{k} = {v:.3g}" for k, v in diffs.items() if not v <= TOLERANCE]
    if bad:
        raise StepFailure(f"{len(bad)} of {len(diffs)} comparisons exceed {TOLERANCE}: " + "; ".join(bad[:6]),
                          numbers)
    different = [name for name, same in bit_identical.items() if not same]
    if different:
        raise StepFailure(f"{len(different)} of {len(bit_identical)} outputs that must be equal bit for bit differ "
                          "(the same batch twice on one device, or GPU vs CPU): " + "; ".join(different[:6]), numbers)
    # Near-ties must stay rare, or the comparison would prove little. uint8 scores make them more
    # common, most of all for the one-cell edge boxes (a cell's own quantized scores).
    if numbers["min_clear_fraction_argmax"] < 0.95:
        raise StepFailure(f"argmax modes: only {numbers['min_clear_fraction_argmax']:.3f} of the rows have a clear "
                          f"top-2 gap (expected >= 0.95)", numbers)
    return numbers


def child_data(s: dict) -> dict:
    import torch
    import torchvision

    from relabel_dali.data.benchdata import make_benchmark_data

    work = Path(s["work"])
    started = time.perf_counter()
    done = [0]

    def progress(count):
        done[0] += count
        print(f"data: {done[0]}/{s['images']} images", flush=True)

    data = make_benchmark_data(work / "data", s["images"], val_count=s["val_images"], sizes=tuple(s["sizes"]),
                               workers=s["cpu_count"], progress=progress)
    torch.manual_seed(0)
    model = torchvision.models.get_model(s["arch"], weights=None, num_classes=1000)
    torch.save(model.state_dict(), work / "data" / "annotator.pth")  # random weights: speed only
    return {"images": data.count, "val_images": s["val_images"], "sizes": s["sizes"],
            "seconds": time.perf_counter() - started}


def child_train(s: dict, variant: str) -> dict:
    import torch

    data = Path(s["work"]) / "data"
    if variant == "fixed_batch":  # the model's own speed: one batch, already on the device
        g = torch.Generator().manual_seed(0)
        batch = {"images": torch.randn(s["train_batch"], 3, s["image_size"], s["image_size"], generator=g),
                 "targets": torch.softmax(torch.randn(s["train_batch"], 1000, generator=g), 1)}
        batch = {k: v.to(s["device"]) for k, v in batch.items()}
        steps = s["images"] // s["train_batch"]
        return train_loop(lambda: (batch for _ in range(steps)), steps, s)
    from relabel_dali.data.official import OfficialStyleLoader

    loader = OfficialStyleLoader(data / "train", data / "pt" if variant == "official" else None,
                                 batch_size=s["train_batch"], image_size=s["image_size"], workers=s["cpu_count"],
                                 device=s["device"])
    return {**train_loop(lambda: iter(loader), len(loader), s), "workers": s["cpu_count"]}


def child_tokens(s: dict) -> dict:
    """The GPU training graph's token targets against pool_labels on the CPU over the same label
    records, boxes and flips: the same bits expected (docs/OPERATOR.md). Dense (the GPU kernel), then
    compact (the CPU operator inside the GPU graph, its outputs moved to the GPU by the loader)."""
    import numpy as np
    import torch

    from relabel_dali.data.loader import build_train_loader
    from relabel_dali.data.settings import Dataset, Labels, Runtime, TrainAugment
    from relabel_dali.ops.pooling import pool_labels
    from relabel_dali.store.reader import LabelShardReader
    from tools.gpu_check.profiles import TOKEN_PATCH

    data = Path(s["work"]) / "data"
    size = s["image_size"] // TOKEN_PATCH
    reader = LabelShardReader(data / "labels")
    numbers = {"token_size": size}
    for compact in (False, True):
        labels = Labels(data / "labels", token_size=size, token_compact=compact)
        loader = build_train_loader(Dataset(data / "train", num_classes=1000, preflight_decodes=0), batch_size=32,
                                    labels=labels, augment=TrainAugment(image_size=s["image_size"]),
                                    runtime=Runtime(device="cuda:0" if s["device"] == "cuda" else "cpu",
                                                    start_method="spawn" if s["device"] == "cuda" else "fork",
                                                    num_threads=2, py_workers=2))
        try:
            batch = next(iter(loader))
            keys = loader.source.keys
        finally:
            loader.close()
        records = [reader.record(keys[i]) for i in batch["indices"].tolist()]
        scores = torch.from_numpy(np.stack([r.scores for r in records]))
        ids = torch.from_numpy(np.stack([r.class_ids for r in records]).astype(np.int64))
        scale = torch.tensor([float(r.scale) for r in records])
        offset = torch.tensor([float(r.offset) for r in records])
        expected = pool_labels(scores, ids, batch["boxes"].cpu(), 1000, scale=scale, offset=offset, output_size=size,
                               mirror=batch["mirror"].cpu(), compact=compact)
        if compact:
            got = [batch[f"token_{name}"].cpu() for name in ("ids", "values", "rest")]
            want = [expected.ids, expected.values, expected.rest]
            diff = max(float((g.double() - w.double()).abs().max()) for g, w in zip(got, want))
            same = all(torch.equal(g, w) for g, w in zip(got, want))
            numbers.update(compact_slots=int(expected.ids.shape[-1]), compact_max_abs_diff_vs_cpu=diff,
                           compact_bit_identical=same, compact_on_device=str(batch["token_values"].device))
            if not same:
                raise StepFailure(f"compact token targets differ from pool_labels(compact=True) on the CPU by "
                                  f"{diff:.3g}", numbers)
        else:
            got = batch["token_targets"].cpu()
            diff = float((got - expected).abs().max())
            numbers.update(batch=len(records), mirrored=int(batch["mirror"].sum()), max_abs_diff_vs_cpu=diff,
                           bit_identical=bool(torch.equal(got, expected)))
            if diff > TOLERANCE:
                raise StepFailure(f"GPU token targets differ from pool_labels on the CPU by {diff:.3g}", numbers)
    return numbers


def run_child(step: str, work: Path) -> int:
    s = json.loads((work / "settings.json").read_text())
    result = {"status": "pass", "reason": "", "numbers": {}}
    try:
        if step.startswith("train_"):
            result["numbers"] = child_train(s, step.removeprefix("train_"))
        else:
            result["numbers"] = globals()[f"child_{step}"](s)
    except StepFailure as failure:
        result.update(status="fail", reason=failure.reason, numbers=failure.numbers)
    except StepSkipped as why:
        result.update(status="skip", reason=str(why))
    from relabel_dali.atomic import atomic_write_bytes

    (work / "results").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(work / "results" / f"{step}.json", (json.dumps(result, indent=1) + "\n").encode())
    return 0
