"""What the trainer step measures: train.py's command line and the speed it logged, and the
trainer's step fed by other loaders (the official-style one, one fixed batch)."""
from __future__ import annotations

import time
from pathlib import Path

from tools.gpu_check.profiles import REPO, TOKEN_ARCH, TOKEN_PATCH, TOKEN_STEPS, StepFailure


def train_overrides(s: dict, data: Path, out_dir: Path, relabel: bool) -> list[str]:
    """train.py's command line for the check (train.py refuses a key configs/base.yaml lacks)."""
    cuda = s["device"] == "cuda"
    workers = max(1, min(8, s["cpu_count"]))
    settings = {
        "model.arch": s["arch"], "model.channels_last": cuda, "compute.device": s["device"],
        "compute.amp": "bf16" if cuda else "none", "data.data_path": data, "data.class_map": "folder",
        "data.image_size": s["image_size"], "data.num_threads": workers, "data.py_workers": max(1, workers // 2),
        "data.relabel.use": relabel, "optim.epochs": s["train_epochs"], "optim.batch_size": s["train_batch"],
        "optim.lr.base_batch_size": s["train_batch"], "optim.warmup.epochs": 0, "util.val_batch_size": s["train_batch"],
        "util.output_dir": out_dir, "util.val_every": 1000, "util.progress": False, "util.tensorboard": True,
        "util.print_freq": 1000,
        "data.preflight_decodes": 0,  # generated, clean JPEGs; and a fresh node may lack simplejpeg
    }
    if relabel:
        settings["data.relabel.path"] = data / "labels"
    argv = ["--config-file-path", str(REPO / "configs" / "base.yaml")]
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    return argv


def token_train_overrides(s: dict, data: Path, out_dir: Path) -> list[str]:
    """train.py on token labels: a ViT-Tiny on its patch grid, TOKEN_STEPS steps, CutMix on, one
    epoch of ``TOKEN_STEPS`` batches listed in a file list."""
    files = sorted(p.relative_to(data / "train").as_posix() for p in (data / "train").rglob("*.JPEG"))
    batch = min(s["train_batch"], 64)
    listing = out_dir.parent / "token_files.txt"
    listing.write_text("\n".join(files[:batch * TOKEN_STEPS]) + "\n")
    argv = train_overrides(s, data, out_dir, True)
    for key, value in {"model.arch": TOKEN_ARCH, "optim.batch_size": batch, "optim.lr.base_batch_size": batch,
                       "util.val_batch_size": batch, "optim.epochs": 1}.items():
        argv[argv.index(f"--{key}") + 1] = str(value)
    return argv + ["--data.relabel.token_size", str(s["image_size"] // TOKEN_PATCH), "--data.file_list", str(listing),
                   "--data.cutmix.prob", "1.0", "--data.cutmix.beta", "1.0", "--data.cutmix.off_epoch", "0",
                   "--optim.optimizer", "adamw", "--optim.lr.init", "1e-3", "--model.channels_last", "false"]


def train_py_stats(out_dir: Path) -> dict:
    """images/s and data-wait fraction train.py logged, averaged over the epochs after the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir / "tb"))
    events.Reload()
    tags = set(events.Tags().get("scalars", []))
    if not {"perf/images_per_s", "perf/data_wait_fraction"} <= tags:
        raise StepFailure(f"{out_dir / 'tb'}: train.py logged no perf/images_per_s and perf/data_wait_fraction")
    rates = events.Scalars("perf/images_per_s")
    waits = events.Scalars("perf/data_wait_fraction")
    keep = slice(1, None) if len(rates) > 1 else slice(None)
    return {"images_per_s": sum(e.value for e in rates[keep]) / len(rates[keep]),
            "data_wait_fraction": sum(e.value for e in waits[keep]) / len(waits[keep]),
            "per_epoch_images_per_s": [e.value for e in rates]}


def train_loop(batches, steps_per_epoch: int, s: dict) -> dict:
    """The trainer's step (same model, AMP, channels-last, soft-target loss) fed by ``batches()``
    (a fresh iterator of ``{"images", "targets"}`` per epoch); images/s and data-wait fraction over
    the epochs after the first, measured as relabel_dali.train.engine measures them."""
    import torch
    import torchvision

    from relabel_dali.train.losses import soft_target_cross_entropy

    device = torch.device(s["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = torchvision.models.get_model(s["arch"], weights=None, num_classes=1000).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    per_epoch = []
    for _ in range(s["train_epochs"]):
        samples, wait_s, steps = 0, 0.0, 0
        start = last = time.perf_counter()
        for batch in batches():
            wait_s += time.perf_counter() - last
            images = batch["images"].to(device, non_blocking=True)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(images)
            loss = soft_target_cross_entropy(logits, batch["targets"].to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += images.shape[0]
            steps += 1
            last = time.perf_counter()
            if steps == steps_per_epoch:
                break
        if cuda:
            torch.cuda.synchronize()
        if not torch.isfinite(loss):
            raise StepFailure(f"the loss is {float(loss)}")
        elapsed = time.perf_counter() - start
        per_epoch.append((samples / elapsed, wait_s / elapsed))
    measured = per_epoch[1:] or per_epoch
    return {"images_per_s": sum(r for r, _ in measured) / len(measured),
            "data_wait_fraction": sum(w for _, w in measured) / len(measured),
            "per_epoch_images_per_s": [r for r, _ in per_epoch]}
