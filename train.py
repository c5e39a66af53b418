"""Train (or evaluate) a classifier on ReLabel targets.

    python train.py --config-file-path configs/demo.yaml [--optim.epochs 3 ...] [--resume auto|PATH]
    torchrun --nproc_per_node=8 train.py --config-file-path configs/relabel_train_resnet50.yaml
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...

Exit codes: 0 done, 1 training failed, 2 bad configuration or command line (or an output folder
without room for two checkpoints), 75 the output folder filled up (the last checkpoint is intact;
``--resume auto`` continues once space is freed), 143 stopped by SIGTERM (at a step boundary; the
workers end with it; ``--resume auto`` continues from the last checkpoint).
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from relabel_dali.atomic import DISK_FULL_EXIT, DiskFullError, atomic_write_bytes
from relabel_dali.train.checkpoint import (BEST_NAME, FORMAT, LAST_NAME, atomic_link, estimate_checkpoint_bytes,
                                           load_checkpoint, load_model_weights, resolve_resume, rng_state,
                                           room_problem, save_keeping_previous, set_rng_state)
from relabel_dali.config import ConfigError, check_values, parse_command_line, save_config, to_plain
from relabel_dali.train.distributed import cleanup, init_distributed, on_main
from relabel_dali.train.engine import (METRICS_NAME, STOPPED_EXIT, RunLogger, StopRequest, Stopped, build_data, build_real,
                                 evaluate, train_one_epoch)
from relabel_dali.store.format import FormatError
from relabel_dali.train.models import TIMM_PREFIX, build_model, import_torchvision, unwrap
from relabel_dali.train.optim import build_optimizer, build_schedule
from relabel_dali.train.trace import RankTrace
from relabel_dali.data.listing import BadSampleError


def log(env, message: str) -> None:
    if env.is_main:
        print(message, flush=True)


def prepare_model(cfg, env):
    torch.manual_seed(cfg.compute.seed)  # identical initial weights on every rank
    model = build_model(cfg).to(env.device)
    if cfg.model.channels_last and env.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def evaluate_weights(cfg, env, data, model) -> dict:
    """util.test_only: evaluates util.test_weight_file (ours or an official checkpoint)."""
    if not cfg.util.test_weight_file:
        raise ConfigError("util.test_only is true but util.test_weight_file is empty")
    load_model_weights(model, cfg.util.test_weight_file)
    return evaluate(model, data.val, cfg, env, build_real(cfg, data.val_keys))


def save(out_dir: Path, model, optimizer, schedule, scaler, cfg, epoch, best_top1, last_metrics, improved,
         stats) -> None:
    """The epoch's checkpoint (refused, DiskFullError, before the last one is touched when the disk
    has no room for it), the best one (a hard link) and metrics.json."""
    save_keeping_previous({"format": FORMAT, "epoch": epoch, "model": unwrap(model).state_dict(),
                           "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                           "scaler": scaler.state_dict(), "best_top1": best_top1, "metrics": last_metrics,
                           "config": to_plain(cfg), "rng": rng_state(), "arch": cfg.model.arch},
                          out_dir / LAST_NAME, size=estimate_checkpoint_bytes(unwrap(model), optimizer))
    if improved:
        atomic_link(out_dir / LAST_NAME, out_dir / BEST_NAME)
    write_metrics(out_dir / METRICS_NAME, epoch, last_metrics, best_top1, stats)


def prepare_output(cfg, out_dir: Path, model, optimizer) -> None:
    """Before any training, so that a full disk does not cost an epoch: room for two checkpoints."""
    out_dir.mkdir(parents=True, exist_ok=True)
    problem = room_problem(out_dir, estimate_checkpoint_bytes(model, optimizer))
    if problem:
        raise ConfigError(f"util.output_dir {problem}; free space or choose another folder")
    save_config(cfg, out_dir / "config.yaml")


def write_metrics(path, epoch: int, metrics: dict, best_top1: float, stats: dict) -> None:
    """``metrics.json`` beside the checkpoints: the latest evaluation, machine-readable."""
    record = {"epoch": epoch, **metrics, "best_top1": best_top1, "train": stats}
    atomic_write_bytes(Path(path), json.dumps(record, indent=2).encode())


def run(cfg, resume, stop: StopRequest) -> int:
    check_values(cfg)
    env = init_distributed(cfg.compute.device, cfg.compute.distributed.backend,
                           cfg.compute.distributed.timeout_s)
    out_dir = Path(cfg.util.output_dir)
    checkpoint_path = None if cfg.util.test_only else resolve_resume(resume, out_dir)
    state = load_checkpoint(checkpoint_path) if checkpoint_path is not None else None  # on the CPU
    start_epoch = state["epoch"] if state is not None else 0
    with collector_skips_loaded_modules(lambda: import_what_the_run_imports(cfg)):
        data = build_data(cfg, env, start_epoch)  # before anything touches CUDA
        try:
            return train(cfg, env, data, state, checkpoint_path, stop)
        finally:
            data.close()  # the pipelines' worker processes end with the run, whatever ended it


def import_what_the_run_imports(cfg) -> None:
    """The run's heavy imports, done before the collector leaves what is loaded out of its passes
    rather than during the run: torchvision (without TorchDynamo: ``import_torchvision``) or timm
    for the model and, when training, TorchDynamo, which torch.optim imports at an optimizer's
    first parameter group (``torch._disable_dynamo``): some 150,000 objects that every full pass
    of the run would go over again. Importing the trainer imports none of them."""
    if cfg.model.arch.startswith(TIMM_PREFIX):
        importlib.import_module("timm")
    else:
        import_torchvision()
    if not cfg.util.test_only:
        importlib.import_module("torch._dynamo")


@contextlib.contextmanager
def collector_skips_loaded_modules(load):
    """Calls ``load()`` with the garbage collector paused (imports make long-lived objects, not
    garbage: each pass it makes over them is wasted), then leaves every object alive (imported
    modules, the configuration: some 340,000 of them, which live as long as the process) out of the
    collector's passes during the run (``gc.freeze``): each full pass, such as the one that stops
    a loader's pipeline and its worker processes, then costs a tenth as much, and forked worker
    processes do not write to the pages that hold those objects. Objects created during the run are
    collected as usual; on leaving, the frozen ones are ordinary again (a process that calls
    ``main`` more than once collects them)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        load()
        gc.freeze()
    finally:
        if enabled:
            gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()


def skip_final_collection() -> None:
    """At exit, the objects alive are left out of the garbage collector's last passes
    (``gc.freeze``): DALI's exit handler collects once more before its library unloads, and the
    interpreter once more as it tears down, each over the 360,000 objects of torch, TorchDynamo and
    DALI (0.3 s and 1-2 s of a two-node run's teardown), to free memory that the operating system
    reclaims anyway. Registered after each run, it runs before the exit handlers registered during
    the run: the pipelines have been stopped and collected by then (``Data.close``); DALI still
    shuts down any pipeline left (``_shutdown_pipelines``), ``weakref.finalize`` callbacks (DALI's
    worker pools) and the modules' own teardown still run; ``__del__`` of objects left in reference
    cycles does not (Python does not promise it at exit either).

    Not where an extension built with nanobind is loaded (triton's from 3.9, which TorchDynamo
    imports: torch 2.15 and newer): nanobind counts its functions, types and objects still alive as
    the interpreter ends and reports each one it finds as a leak, some 600 lines on every rank, and
    the objects the last passes skip are alive then. The exit costs the 1-2 s instead."""
    if not nanobind_loaded():
        gc.freeze()


def nanobind_loaded() -> bool:
    """Whether an extension module built with nanobind is loaded: one holding nanobind's functions
    (of type ``nb_func``), classes (of metaclass ``nb_type``) or their instances."""
    for module in list(sys.modules.values()):
        if not (getattr(module, "__file__", None) or "").endswith((".so", ".pyd")):
            continue
        for value in list(vars(module).values()):
            if {type(value).__name__, type(type(value)).__name__} & {"nb_func", "nb_type"}:
                return True
    return False


def train(cfg, env, data, state, checkpoint_path, stop: StopRequest) -> int:
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
        torch.backends.cudnn.benchmark = True
    model = prepare_model(cfg, env)
    if cfg.util.test_only:
        result = evaluate_weights(cfg, env, data, model)
        log(env, "test  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in result.items()) + f"  ({cfg.util.test_weight_file})")
        return 0

    out_dir = Path(cfg.util.output_dir)
    optimizer = build_optimizer(cfg, model)
    schedule = build_schedule(cfg, optimizer, steps_per_epoch=len(data.train))
    scaler = torch.amp.GradScaler("cuda", enabled=env.device.type == "cuda" and cfg.compute.amp == "fp16")
    start_epoch, best_top1, metrics = 0, float("-inf"), {}
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, best_top1, metrics = state["epoch"], state["best_top1"], state.get("metrics", {})
        log(env, f"resumed from {checkpoint_path} at epoch {start_epoch}")
    on_main(env, lambda: prepare_output(cfg, out_dir, model, optimizer), ConfigError, DiskFullError)
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    logger = RunLogger(out_dir / "tb" if env.is_main and cfg.util.tensorboard else None)
    trace = RankTrace(out_dir, env) if cfg.util.trace_ranks else None
    real = build_real(cfg, data.val_keys)
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.optim.epochs):
            loader = data.train_epoch(epoch)
            stats = train_one_epoch(model, trace.recording(loader) if trace else loader, optimizer, schedule, scaler,
                                    cfg, epoch, env, logger, stop=stop)
            if trace:
                trace.epoch_done(epoch, unwrap(model))
            last = epoch + 1 == cfg.optim.epochs
            if last or (epoch + 1) % cfg.util.val_every == 0:
                metrics = evaluate(model, data.val, cfg, env, real)
                for name in ("top1", "top5", "real_top1"):
                    if name in metrics:
                        logger.scalar(f"val/{name}", metrics[name], epoch + 1)
            improved = metrics.get("top1", float("-inf")) > best_top1
            best_top1 = max(best_top1, metrics.get("top1", float("-inf")))
            log(env, f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {stats['loss']:.4f}  "
                     f"top1 {metrics.get('top1', float('nan')):.2f}  top5 {metrics.get('top5', float('nan')):.2f}  "
                     f"{stats['images_per_s']:.0f} img/s  data wait {100 * stats['data_wait_fraction']:.0f}%")
            on_main(env, lambda: save(out_dir, model, optimizer, schedule, scaler, cfg, epoch + 1, best_top1,
                                      metrics, improved, stats), DiskFullError)
    except Stopped as stopped:
        log(env, f"train.py: {stopped}; the last checkpoint is {out_dir / LAST_NAME} "
                 f"(resume with --resume auto: it restarts that epoch)")
        return STOPPED_EXIT
    finally:
        logger.close()
    elapsed = time.perf_counter() - started
    log(env, f"done in {elapsed / 60:.1f} min ({elapsed:.0f} s): best top-1 {best_top1:.2f}%; checkpoints {out_dir / LAST_NAME}, "
             f"{out_dir / BEST_NAME}; config {out_dir / 'config.yaml'}; metrics {out_dir / METRICS_NAME}; "
             f"TensorBoard logs {out_dir / 'tb'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, resume = parse_command_line(argv)
    except ConfigError as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 2
    stop = StopRequest.install()  # SIGTERM (SLURM's preemption signal): stop at the next step
    try:
        return run(cfg, resume, stop)
    except ConfigError as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 2
    except (FormatError, BadSampleError) as error:  # bad data found before or while training
        print(f"train.py: {error}", file=sys.stderr)
        return 1
    except DiskFullError as error:  # nothing half-written: the last checkpoint is the last good one
        print(f"train.py: {error}; free space (or raise the quota) and continue with --resume auto", file=sys.stderr)
        return DISK_FULL_EXIT
    finally:
        stop.uninstall()
        cleanup()
        atexit.unregister(skip_final_collection)  # once, and after the handlers registered so far (DALI's):
        atexit.register(skip_final_collection)  # exit handlers run last registered first


if __name__ == "__main__":
    sys.exit(main())
