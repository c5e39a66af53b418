#!/usr/bin/env python
"""Annotate an image tree with a classifier's dense top-k label maps, written straight into label shards.

    python tools/relabel.py IMAGE_ROOT OUT [--arch efficientnet-lite0|NAME|timm:NAME] [--weights FILE] [--size 480]
        [--classes imagenet|folder|FILE] [--topk 5] [--batch-size 32] [--dtype float32|float16|uint8]
        [--records-per-shard 10000]
        [--exif] [--write-pt DIR] [--device auto|cpu|cuda] [--no-amp] [--limit N] [--on-error fail|skip]
    torchrun --nproc_per_node 8 tools/relabel.py IMAGE_ROOT OUT ...

Every image is decoded with DALI, resized to SIZE x SIZE without cropping (with the model's
interpolation), normalized for the model and run fully convolutionally (docs/ANNOTATOR.md): a
stride-32 network at 480 px gives 15x15 maps; a vision transformer gives one cell per patch.
Per location the top-k raw logits and their class ids are stored in canonical [k, y, x] layout,
in the same shards and index.json that tools/pack_labels.py writes; --write-pt also writes
official-layout ``[2, k, x, y]`` files (class ids as floats) under DIR.

--classes restricts the annotator to the dataset's classes: ``imagenet`` keeps all of the
annotator's classes (ids in its own label space); ``folder`` takes the class folders in sorted
order (an annotator with one class per folder numbers them as ImageFolder does, class i = i-th
folder; a 1000-class one by their ImageNet WordNet ids); FILE is JSON, dataset class name ->
annotator class index (or the inverse). The logits are restricted to those classes before the
top-k, the stored class ids are dataset indices (the sorted position of the class name, as
train.py's ``data.class_map: folder`` numbers them) and the shards' num_classes is the dataset's.

Keys are image paths relative to IMAGE_ROOT without extension, in sorted order; shard ``j``
holds the ``j``-th run of --records-per-shard keys. Under torchrun every rank takes a contiguous
run of whole shards, so the index keeps the sorted order for any number of processes; rank 0
writes index.json after all ranks finish. A killed run resumes by running the same command again
(complete shards are kept, with any number of processes).

An image the decoder rejects stops the run with its name and the decoder's message
(--on-error fail, the default; nothing of the shard being written is kept), or is left out of the
shards (--on-error skip): the skipped images and the decoder's messages are listed at the end and
kept in ``labels-NNNNN.skipped.json`` beside their shard, so a resumed run still reports them.

A resume continues only the same job: each shard records its source images (path, size,
modification time), and a complete shard made from other images stops the run naming the first
difference. SIGTERM stops at the next image (the shard being written is discarded, complete ones
stay); rerunning the same command continues.

Exit codes: 0 done; 1 bad arguments, an undecodable image (--on-error fail), or settings or source
images differing from the run being resumed; 3 done, but images were skipped (--on-error skip);
75 the disk (or quota) is full: one line names the file, the bytes needed and the bytes free; the
shard being written is discarded and the same command continues once space is freed;
143 stopped by SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from relabel_dali.store import format as fmt
from relabel_dali.annotate.annotator import build_annotator, class_subset, default_input_size, restrict_logits, topk_maps
from relabel_dali.atomic import DISK_FULL_EXIT, DiskFullError, atomic_write_bytes
from relabel_dali.data.encoded import encoded_problem
from relabel_dali.train.checkpoint import atomic_torch_save
from relabel_dali.train.engine import STOPPED_EXIT, StopRequest, Stopped
from relabel_dali.store.labelmaps import IMAGE_SUFFIXES, is_image, label_key, to_official
from relabel_dali.progress import progress
from relabel_dali.store.writer import LabelShardWriter

SETTINGS_NAME = "relabel_settings.json"
EXIT_OK, EXIT_FAILED, EXIT_SKIPPED = 0, 1, 3
SKIPPED_SUFFIX = ".skipped.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image_root", type=Path, help="image tree (e.g. ImageNet train/)")
    parser.add_argument("out", type=Path, help="output folder for label shards and index.json")
    parser.add_argument("--arch", default="efficientnet-lite0",
                        help="efficientnet-lite0/1/2, a torchvision classifier name or timm:NAME "
                             "(default efficientnet-lite0)")
    parser.add_argument("--weights", type=Path,
                        help="weights file (required for torchvision archs; for timm: safetensors or a torch file, "
                             "else timm's cache/hub)")
    parser.add_argument("--size", type=int,
                        help="square input side in pixels (default: a timm model's pretrained input size, else 480)")
    parser.add_argument("--classes", default="imagenet", metavar="imagenet|folder|FILE",
                        help="label space: all the annotator's classes (imagenet, default), the class folders in "
                             "sorted order (folder: class i = i-th folder for an annotator of one class per folder, "
                             "else their ImageNet WordNet ids), or a JSON file of class name -> annotator index")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(fmt.SCORE_DTYPE_NAMES), default="float16")
    parser.add_argument("--records-per-shard", type=int, default=10000)
    parser.add_argument("--exif", action="store_true",
                        help="rotate images by their EXIF orientation (off: the frame the official maps use)")
    parser.add_argument("--write-pt", type=Path, metavar="DIR", help="also write official-layout .pt maps here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-amp", action="store_true", help="run in float32 on the GPU")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DALI and torch CPU threads")
    parser.add_argument("--limit", type=int, help="annotate only the first N keys (for benchmarks)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="an image the decoder rejects: stop naming it (fail, default) or leave it out, "
                             "list it and exit 3 (skip)")
    args = parser.parse_args(argv)
    for name in ("size", "topk", "batch_size", "records_per_shard", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be positive, got {args.limit}")
    return args


def find_images(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder does not exist")
    images: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if is_image(path):
            key = label_key(path, root)
            if key in images:
                raise ValueError(f"{path}: duplicate key {key!r}, already given by {images[key]}")
            images[key] = path
    if not images:
        raise FileNotFoundError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def annotation_pipeline(files: list[Path], *, size: int, mean, std, exif: bool, batch_size: int,
                        device_id: int | None, num_threads: int, interpolation: str = "bilinear"):
    """Decode -> resize to size x size (no crop) -> normalize to CHW float, in file order."""
    from nvidia.dali import fn, pipeline_def, types

    interp_types = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN,
                    "lanczos": types.INTERP_LANCZOS3}

    def batches():
        for start in range(0, len(files), batch_size):
            yield [np.fromfile(path, dtype=np.uint8) for path in files[start:start + batch_size]]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, exec_dynamic=True)
    def pipeline():
        encoded = fn.external_source(source=batches, batch=True, dtype=types.UINT8, ndim=1, cycle=None)
        images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                   output_type=types.RGB, adjust_orientation=exif)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp_types[interpolation])
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255 * m for m in mean], std=[255 * s for s in std])

    pipe = pipeline()
    pipe.build()
    return pipe


def to_torch(batch, device: torch.device) -> torch.Tensor:
    tensor = batch.as_tensor()
    if device.type == "cpu":
        return torch.from_numpy(np.asarray(tensor))
    from nvidia.dali.plugin.pytorch import feed_ndarray

    out = torch.empty(tensor.shape(), dtype=torch.float32, device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
    return out


class Annotator:
    """Runs the model over the pipeline's batches and yields one canonical top-k map per image."""

    def __init__(self, model, *, topk: int, device: torch.device, amp: bool, class_ids: list[int] | None = None):
        """``class_ids``: the annotator's class per dataset class (None: all of its classes)."""
        self.model, self.topk, self.device, self.amp = model, topk, device, amp
        self.class_ids = None if class_ids is None else torch.tensor(class_ids, dtype=torch.int64, device=device)

    @torch.inference_mode()
    def maps(self, images: torch.Tensor):
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            dense = restrict_logits(self.model(images), self.class_ids)
        scores, class_ids = topk_maps(dense, self.topk)
        top1 = dense.float().mean((2, 3)).argmax(1)
        return scores.cpu().numpy(), class_ids.cpu().numpy(), top1.cpu().numpy()

    def run(self, keys: list[str], files: list[Path], pipe_args: dict, on_error: str = "fail"):
        """Yields (key, scores [k, h, w], class_ids [k, h, w], top-1 class of the map's mean) per
        image, in key order. An image the decoder rejects raises :class:`DecodeError` naming it
        (``on_error="fail"``) or is yielded as (key, None, None, the decoder's message) ("skip"):
        the pipeline is then rebuilt from the next image on."""
        batch_size = pipe_args["batch_size"]
        skipped: dict[int, str] = {}
        position = 0  # the next image to yield
        while position < len(files):
            todo = [i for i in range(position, len(files)) if i not in skipped]
            pipe = annotation_pipeline([files[i] for i in todo], **pipe_args) if todo else None
            for start in range(0, len(todo), batch_size):
                indices = todo[start:start + batch_size]
                try:
                    (batch,) = pipe.run()
                except RuntimeError as error:
                    bad = undecodable([files[i] for i in indices], pipe_args)
                    if not bad:
                        raise DecodeError(f"decoding failed in the batch of {files[indices[0]]} .. "
                                          f"{files[indices[-1]]}, yet each of its images decodes alone: "
                                          f"{decoder_message(str(error))}") from None
                    if on_error == "fail":
                        (first, message), *others = bad.items()
                        also = f" ({len(others)} more in its batch)" if others else ""
                        raise DecodeError(f"{files[indices[first]]}: cannot be decoded: {message}{also}; "
                                          "--on-error skip leaves such images out") from None
                    skipped.update({indices[j]: message for j, message in bad.items()})
                    break
                scores, class_ids, top1 = self.maps(to_torch(batch, self.device))
                for j, i in enumerate(indices):
                    for earlier in range(position, i):  # skipped images before this one
                        yield keys[earlier], None, None, skipped[earlier]
                    yield keys[i], scores[j], class_ids[j], int(top1[j])
                    position = i + 1
            else:
                for earlier in range(position, len(files)):
                    yield keys[earlier], None, None, skipped[earlier]
                position = len(files)


class DecodeError(RuntimeError):
    """An image the decoder rejects."""


def decoder_message(error: str) -> str:
    """The part of a DALI pipeline error that the decoder wrote (after 'encountered:')."""
    lines = [line.strip() for line in error.split("encountered:", 1)[-1].splitlines()]
    lines = [line for line in lines if line and "pipeline object is no longer valid" not in line
             and not line.startswith("Critical error in pipeline")]
    return " ".join(lines) or error.strip()


def undecodable(files: list[Path], pipe_args: dict) -> dict[int, str]:
    """Decodes each file alone with the same decoder: {position in files: the decoder's message}
    for those that fail. The decoder's own log lines (written to the process's stderr by the
    native library) are captured and added to the message, and so is what a look at the bytes
    finds (empty, truncated, not an image)."""
    import tempfile

    bad = {}
    for position, path in enumerate(files):
        with tempfile.TemporaryFile() as log:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(log.fileno(), 2)
            try:
                annotation_pipeline([path], **{**pipe_args, "batch_size": 1}).run()
                failure = None
            except RuntimeError as error:
                failure = decoder_message(str(error))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            log.seek(0)
            native = " ".join(line.strip() for line in log.read().decode(errors="replace").splitlines()
                              if line.strip())
        if failure is not None:
            native = native.replace("\x1b[0;31m", "").replace("\x1b[0m", "")
            structure = encoded_problem(path.read_bytes())
            bad[position] = "; ".join(note for note in (failure, native, structure) if note)
    return bad


def map_size(model, size: int, device: torch.device) -> tuple[int, int]:
    with torch.inference_mode():
        dense = model(torch.zeros(1, 3, size, size, device=device))
    return int(dense.shape[2]), int(dense.shape[3])


def check_settings(out: Path, settings: dict, write: bool) -> None:
    """A resumed run must use the settings of the run it continues, or the shards would mix."""
    path = out / SETTINGS_NAME
    if (out / "pack_settings.json").exists():
        raise ValueError(f"{out} holds shards packed by tools/pack_labels.py; annotate into another folder")
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in set(settings) | set(previous) if previous.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out} was annotated with other settings ({', '.join(changed)} differ); "
                             "use a fresh output folder or the same arguments")
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode())


def write_pt(root: Path, key: str, scores: np.ndarray, class_ids: np.ndarray) -> None:
    atomic_torch_save(torch.from_numpy(to_official(scores, class_ids)), root / f"{key}.pt")


def class_folders(keys) -> list[str]:
    return sorted({key.split("/")[0] for key in keys if "/" in key})


def folder_labels(keys: list[str], subset: tuple[list[str], list[int]] | None, num_classes: int) -> dict[str, int]:
    """Each key's class in the written label space, from its top folder, where one is known: the
    dataset index under --classes folder/FILE; the ImageNet-1k index of a wnid folder for a
    1000-class annotator otherwise."""
    if subset is not None:
        index = {name: i for i, name in enumerate(subset[0])}
        return {key: index[key.split("/")[0]] for key in keys if "/" in key and key.split("/")[0] in index}
    if num_classes != 1000:
        return {}
    from relabel_dali.data import imagenet

    try:
        lookup = {wnid: i for i, wnid in enumerate(imagenet.wnids())}
    except ModuleNotFoundError:
        return {}
    return {key: lookup[key.split("/")[0]] for key in keys if "/" in key and key.split("/")[0] in lookup}


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; initializes the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return rank, world, local_rank


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def relabel(args: argparse.Namespace, stop: StopRequest | None = None) -> int:
    stop = stop or StopRequest()
    started = time.perf_counter()
    rank, world, local_rank = distributed()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        # Before the first barrier: NCCL and every bare CUDA call use the current device.
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)

    images = find_images(args.image_root)
    keys = sorted(images)[: args.limit]
    if args.size is None:
        args.size = default_input_size(args.arch)
    # The model and the classes first: a refused architecture or class list leaves no settings file.
    model = build_annotator(args.arch, args.weights, args.size).to(device)
    subset = class_subset(args.classes, class_folders(images), model.num_classes, args.arch)
    num_classes = model.num_classes if subset is None else len(subset[0])
    if args.topk > num_classes:
        raise ValueError(f"--topk {args.topk} is more than the {num_classes} classes of --classes {args.classes}")
    settings = {"arch": args.arch, "weights": str(args.weights) if args.weights else None, "size": args.size,
                "topk": args.topk, "dtype": args.dtype, "exif": args.exif, "images": len(keys),
                "records_per_shard": args.records_per_shard, "scores": "logits",
                "classes": None if subset is None else {"spec": args.classes, "names": subset[0],
                                                        "annotator_ids": subset[1]}}
    check_settings(args.out, settings, write=rank == 0)
    barrier(world)
    check_settings(args.out, settings, write=False)

    height, width = map_size(model, args.size, device)
    writer = LabelShardWriter(args.out, k=args.topk, height=height, width=width,
                              num_classes=num_classes, score_dtype=args.dtype, source_root=args.image_root)
    chunks = [keys[i:i + args.records_per_shard] for i in range(0, len(keys), args.records_per_shard)]
    names = [f"labels-{j:05d}" for j in range(len(chunks))]
    mine = range(rank * len(chunks) // world, (rank + 1) * len(chunks) // world)
    sources = [{key: images[key] for key in chunk} for chunk in chunks]  # recorded per shard: a resume
    todo = [j for j in mine if not writer.shard_done(names[j], sources[j])]  # must continue the same job
    todo_keys = [key for j in todo for key in chunks[j]]

    pipe_args = dict(size=args.size, mean=model.mean, std=model.std, interpolation=model.interpolation,
                     exif=args.exif, batch_size=args.batch_size, device_id=local_rank if use_cuda else None,
                     num_threads=args.threads)
    annotator = Annotator(model, topk=args.topk, device=device, amp=use_cuda and not args.no_amp,
                          class_ids=None if subset is None else subset[1])
    labels = folder_labels(todo_keys, subset, model.num_classes)
    bar = progress(len(todo_keys), unit="img", desc=f"annotating (rank {rank})" if world > 1 else "annotating",
                   disable=rank != 0)
    agree = known = 0
    annotate_started = time.perf_counter()
    if todo_keys:
        stream = annotator.run(todo_keys, [images[key] for key in todo_keys], pipe_args, on_error=args.on_error)
        for j in todo:
            with writer.shard(names[j], sources[j]) as shard:
                skipped = {}
                for expected_key in chunks[j]:
                    key, scores, class_ids, top1 = next(stream)
                    assert key == expected_key
                    bar.update()
                    stop.check(f"in shard {names[j]} (its part is discarded; complete shards are kept)")
                    if scores is None:
                        skipped[str(images[key])] = top1  # the decoder's message
                        continue
                    shard.add(key, scores, class_ids)
                    if args.write_pt is not None:
                        write_pt(args.write_pt, key, scores, class_ids)
                    label = labels.get(key)
                    if label is not None:
                        known += 1
                        agree += top1 == label
                write_skipped(args.out / f"{names[j]}{SKIPPED_SUFFIX}", skipped)
    bar.close()
    annotate_seconds = time.perf_counter() - annotate_started
    barrier(world)
    if rank == 0:
        index = writer.finalize(names)
        rate = len(todo_keys) / max(annotate_seconds, 1e-9)
        lines = [
            f"annotated {len(todo_keys)} images on rank 0 ({world} process(es)); {index['records']} records in "
            f"{len(names)} shards in {args.out} ({len(mine) - len(todo)} of rank 0's shards kept from an earlier run)",
            f"  model: {args.arch} at {args.size}x{args.size} px ({model.interpolation}) -> {height}x{width} maps, "
            f"top-{args.topk} raw logits, {args.dtype} on {device}" + (" with AMP" if annotator.amp else ""),
            "  the maps' mean over locations " + ("equals" if model.exact else "is NOT") + " the model's own logits"
            + ("" if model.exact else " (per-token head of a class-token or post-pooling-norm transformer; "
                                      "docs/ANNOTATOR.md)"),
            f"  speed: {rate:.1f} images/s on rank 0 "
            f"({len(todo_keys)} images in {annotate_seconds:.1f} s; {time.perf_counter() - started:.1f} s in all)",
        ]
        if subset is not None:
            lines.append(f"  classes: the dataset's {num_classes} (--classes {args.classes}), class ids "
                         f"0..{num_classes - 1} in sorted class-name order; every other annotator class ignored")
        if known:
            space = f"among the {num_classes} dataset classes" if subset is not None else "ImageNet-1k"
            lines.append(f"  the map's top-1 ({space}) equals the folder's class for {agree}/{known} images "
                         f"on rank 0 ({100 * agree / known:.1f} %)")
        if args.write_pt is not None:
            lines.append(f"  official-layout .pt maps in {args.write_pt}")
        print("\n".join(lines))
    barrier(world)
    skipped = read_skipped(args.out, names)
    if skipped and rank == 0:
        listing = "\n".join(f"  {path}: {message}" for path, message in sorted(skipped.items()))
        print(f"{len(skipped)} image(s) the decoder rejects were skipped (not in the shards; "
              f"listed in {args.out}/labels-*{SKIPPED_SUFFIX}):\n{listing}", file=sys.stderr)
    return EXIT_SKIPPED if skipped else EXIT_OK


def write_skipped(path: Path, skipped: dict[str, str]) -> None:
    """Inside the shard's ``with``: the list is in place before the shard counts as done, and a
    redone shard replaces an older list."""
    if skipped:
        atomic_write_bytes(path, (json.dumps(skipped, indent=1, sort_keys=True) + "\n").encode())
    else:
        path.unlink(missing_ok=True)


def read_skipped(out: Path, names: list[str]) -> dict[str, str]:
    skipped = {}
    for name in names:
        path = out / f"{name}{SKIPPED_SUFFIX}"
        if path.exists():
            skipped.update(json.loads(path.read_text()))
    return skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = StopRequest.install()  # SIGTERM: stop at the next image, keep complete shards
    try:
        return relabel(args, stop)
    except Stopped as stopped:
        print(f"relabel.py: {stopped}; rerun the same command to continue", file=sys.stderr)
        return STOPPED_EXIT
    except DiskFullError as error:
        print(f"error: {error}; free space (or raise the quota) and rerun the same command (complete shards are "
              f"kept)", file=sys.stderr)
        return DISK_FULL_EXIT
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        stop.uninstall()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
