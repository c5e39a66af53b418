"""End to end on a tiny dataset (CPU): exact resume, TensorBoard tags, test-only evaluation of
saved and official-layout checkpoints, and a two-process torchrun run with disjoint shards."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from conftest import CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, argv_for, kill_after_one_epoch_and_resume
from relabel_dali.config import parse_command_line
from relabel_dali.train.distributed import DistEnv, init_distributed
from relabel_dali.train.engine import build_data, resolve_start_method

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert train.main(argv_for(tiny, out, "--data.real_labels", str(tiny / "real.json"))) == 0
    return out


def assert_same_training_state(resumed: dict, straight: dict) -> None:
    assert resumed["epoch"] == straight["epoch"] == 2
    assert states_equal(resumed["model"], straight["model"])
    assert resumed["schedule"] == straight["schedule"]
    momenta = [(s["momentum_buffer"], t["momentum_buffer"]) for s, t in
               zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values())]
    assert momenta and all(torch.equal(a, b) for a, b in momenta)


class TestResume:
    def test_killed_and_resumed_equals_uninterrupted(self, tiny, straight_run, tmp_path, monkeypatch):
        argv = argv_for(tiny, tmp_path, "--data.real_labels", str(tiny / "real.json"))
        resumed = kill_after_one_epoch_and_resume(argv, tmp_path, monkeypatch)
        assert_same_training_state(resumed, torch.load(straight_run / "checkpoint-last.pth", weights_only=False))

    def test_resolved_config_saved(self, straight_run):
        saved, _ = parse_command_line(["--config-file-path", str(straight_run / "config.yaml")])
        assert saved.optim.epochs == 2 and saved.util.output_dir == str(straight_run)


class TestTimmStudent:
    """A timm model as the student: the same exact resume and test-only evaluation."""

    @staticmethod
    def timm_argv(root: Path, out: Path, *extra: str, arch: str = "timm:resnet10t",
                  kwargs: str = "{drop_path_rate: 0.1}") -> list[str]:
        argv = argv_for(root, out, *extra)
        argv[argv.index("--model.arch") + 1], argv[argv.index("--model.kwargs") + 1] = arch, kwargs
        return argv

    def test_killed_and_resumed_equals_uninterrupted(self, tiny, tmp_path, monkeypatch):
        straight_out, resumed_out = tmp_path / "straight", tmp_path / "resumed"
        assert train.main(self.timm_argv(tiny, straight_out)) == 0
        straight = torch.load(straight_out / "checkpoint-last.pth", weights_only=False)
        assert straight["arch"] == "timm:resnet10t"
        assert straight["model"]["fc.weight"].shape == (len(CLASSES), 512)
        resumed = kill_after_one_epoch_and_resume(self.timm_argv(tiny, resumed_out), resumed_out, monkeypatch)
        assert_same_training_state(resumed, straight)

        argv = self.timm_argv(tiny, tmp_path / "eval", "--util.test_only", "True",
                              "--util.test_weight_file", str(straight_out / "checkpoint-last.pth"))
        cfg, _ = parse_command_line(argv)
        env = init_distributed("cpu")
        result = train.evaluate_weights(cfg, env, build_data(cfg, env), train.prepare_model(cfg, env))
        assert result == pytest.approx(straight["metrics"])  # what the run measured at its last epoch

    def test_deit_s_config_builds_the_recipe(self):
        from relabel_dali.train.models import build_model
        from relabel_dali.train.optim import build_optimizer, build_schedule

        cfg, _ = parse_command_line(["--config-file-path", str(REPO / "configs" / "relabel_deit_s.yaml")])
        model = build_model(cfg)
        assert type(model).__name__ == "VisionTransformer" and model.head.out_features == 1000
        assert sum(p.numel() for p in model.parameters()) == 22_050_664  # DeiT-S with a 1000-class head
        optimizer = build_optimizer(cfg, model)
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
        assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * 1024 / 512)
        schedule = build_schedule(cfg, optimizer, steps_per_epoch=10)
        assert (schedule.total_steps, schedule.warmup_steps, schedule.decay_type) == (3000, 50, "cos")

    def test_vision_transformer_is_built_for_the_image_size(self):
        from relabel_dali.train.models import build_model

        cfg, _ = parse_command_line(["--model.arch", "timm:vit_tiny_patch16_224", "--data.image_size", "64",
                                     "--data.num_classes", "3"])
        model = build_model(cfg)
        assert model.patch_embed.grid_size == (4, 4) and model.pos_embed.shape[1] == 1 + 16
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)

    @pytest.mark.parametrize("arch, kwargs, message", [
        ("timm:resnet10x", "{}", "'timm:resnet10x' is not a timm model; closest: .*resnet10t"),
        ("timm:resnet10t", "{num_classes: 5}", "model.kwargs.num_classes: set by the trainer"),
        ("timm:resnet10t", "{width_mult: 0.5}", "model.kwargs .* for timm:resnet10t: .*width_mult"),
    ])
    def test_bad_timm_settings_exit_2(self, tiny, tmp_path, capsys, arch, kwargs, message):
        import re

        assert train.main(self.timm_argv(tiny, tmp_path, arch=arch, kwargs=kwargs)) == 2
        assert re.search(message, capsys.readouterr().err)


class TestTensorBoard:
    def test_expected_tags_and_values(self, straight_run):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(straight_run / "tb"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/lr", "val/top1", "val/top5", "val/real_top1", "perf/images_per_s",
                "perf/data_wait_fraction"} <= tags
        last = torch.load(straight_run / "checkpoint-last.pth", weights_only=False)["metrics"]
        assert events.Scalars("val/top1")[-1].value == pytest.approx(last["top1"])
        assert events.Scalars("val/real_top1")[-1].value == pytest.approx(last["real_top1"])
        wait = [event.value for event in events.Scalars("perf/data_wait_fraction")]
        assert len(wait) == 2 and all(0.0 <= value <= 1.0 for value in wait)


class TestTestOnly:
    @pytest.mark.parametrize("layout", ["ours", "official_module_prefixed"])
    def test_evaluates_saved_weights(self, tiny, straight_run, tmp_path, layout):
        last = torch.load(straight_run / "checkpoint-last.pth", weights_only=False)
        weights = tmp_path / "weights.pth"
        if layout == "ours":
            weights = straight_run / "checkpoint-last.pth"
        else:
            torch.save({"state_dict": {f"module.{k}": v for k, v in last["model"].items()}, "epoch": 2}, weights)
        argv = argv_for(tiny, tmp_path / "eval", "--data.real_labels", str(tiny / "real.json"),
                        "--util.test_only", "True", "--util.test_weight_file", str(weights))
        cfg, _ = parse_command_line(argv)
        env = init_distributed("cpu")
        data = build_data(cfg, env)
        result = train.evaluate_weights(cfg, env, data, train.prepare_model(cfg, env))
        # The training run evaluated the same weights on the same images at its last epoch.
        assert result == pytest.approx(last["metrics"])
        assert result["samples"] == len(CLASSES) * VAL_PER_CLASS
        assert result["real_samples"] == len(CLASSES) * VAL_PER_CLASS - 1
        assert train.main(argv) == 0

    def test_needs_a_weight_file(self, tiny, tmp_path, capsys):
        assert train.main(argv_for(tiny, tmp_path, "--util.test_only", "True")) == 2
        assert "util.test_weight_file is empty" in capsys.readouterr().err


class TestCommandLine:
    def test_unknown_key_exits_2(self, capsys):
        assert train.main(["--optim.epoch", "3"]) == 2
        assert "did you mean 'optim.epochs'" in capsys.readouterr().err


class TestBuildData:
    def test_fork_is_refused_on_the_gpu(self, tmp_path):
        # The second GPU pipeline would fork after the first initialised CUDA. The check comes
        # before any pipeline is built, so it runs without a GPU.
        cfg, _ = parse_command_line(["--data.data_path", str(tmp_path), "--data.relabel.use", "False",
                                     "--data.start_method", "fork"])
        env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
        with pytest.raises(ValueError, match="start_method fork cannot work on the GPU.*spawn"):
            build_data(cfg, env)


    @pytest.mark.parametrize("device, expected", [("cpu", "fork"), ("cuda", "spawn")])
    def test_auto_start_method(self, device, expected):
        assert resolve_start_method("auto", torch.device(device)) == expected
        assert resolve_start_method("spawn", torch.device(device)) == "spawn"
        with pytest.raises(ValueError, match="start_method 'thread': expected auto, fork or spawn"):
            resolve_start_method("thread", torch.device(device))


DRIVER = textwrap.dedent("""
    import sys, torch
    import train
    from relabel_dali.train.models import unwrap

    out = sys.argv.pop(1)
    seen, original, original_eval = [], train.train_one_epoch, train.evaluate

    class Recording:
        def __init__(self, loader):
            self.loader = loader
        def __len__(self):
            return len(self.loader)
        def __iter__(self):
            for batch in self.loader:
                seen.extend(batch["indices"].tolist())
                yield batch

    def train_one_epoch(model, loader, *args, **kwargs):
        stats = original(model, Recording(loader), *args, **kwargs)
        rank = torch.distributed.get_rank()
        params = {name: p.detach().clone() for name, p in unwrap(model).named_parameters()}
        torch.save({"seen": list(seen), "params": params}, f"{out}/rank{rank}.pt")
        return stats

    def evaluate(*args, **kwargs):
        result = original_eval(*args, **kwargs)
        torch.save(result, f"{out}/eval{torch.distributed.get_rank()}.pt")
        return result

    train.train_one_epoch, train.evaluate = train_one_epoch, evaluate
    sys.exit(train.main())
""")


class TestTorchrun:
    def test_two_processes_gloo(self, tiny, tmp_path):
        driver = tmp_path / "driver.py"
        driver.write_text(DRIVER)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(driver), str(tmp_path), *argv_for(tiny, tmp_path / "run", "--optim.epochs", "1",
                                                         "--optim.warmup.epochs", "0")]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
        seen0, seen1 = set(ranks[0]["seen"]), set(ranks[1]["seen"])
        assert not seen0 & seen1
        assert seen0 | seen1 == set(range(len(CLASSES) * TRAIN_PER_CLASS))
        # Parameters, not BN running statistics: those follow each rank's own last batch.
        assert states_equal(ranks[0]["params"], ranks[1]["params"])
        saved = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=False)
        assert states_equal({name: saved["model"][name] for name in ranks[0]["params"]}, ranks[0]["params"])
        evals = [torch.load(tmp_path / f"eval{r}.pt") for r in range(2)]
        assert evals[0] == evals[1] and evals[0]["samples"] == len(CLASSES) * VAL_PER_CLASS


class ListLoader(list):
    """A loader stand-in: a fixed list of batches."""


def synthetic_batches(steps, batch=4, classes=3, size=16):
    gen = torch.Generator().manual_seed(0)
    return ListLoader({"images": torch.randn(batch, 3, size, size, generator=gen),
                       "targets": torch.softmax(torch.randn(batch, classes, generator=gen), 1),
                       "labels": torch.randint(classes, (batch,), generator=gen)} for _ in range(steps))


class TestTrainOneEpoch:
    @pytest.mark.parametrize("epochs, off_epoch, expected", [(10, 5, [True] * 5 + [False] * 5), (3, 0, [True] * 3)])
    def test_cutmix_switched_off_for_last_epochs(self, epochs, off_epoch, expected):
        from relabel_dali.train.engine import cutmix_active

        cfg, _ = parse_command_line(["--data.cutmix.prob", "1", "--data.cutmix.beta", "1",
                                     "--optim.epochs", str(epochs), "--data.cutmix.off_epoch", str(off_epoch)])
        assert [cutmix_active(cfg, e) for e in range(epochs)] == expected

    def test_steps_schedule_and_cutmix(self, monkeypatch):
        import relabel_dali.train.cutmix as cutmix
        from relabel_dali.train.engine import train_one_epoch
        from relabel_dali.train.optim import build_optimizer, build_schedule, lr_at

        calls = []
        original = cutmix.cutmix_batch
        monkeypatch.setattr(cutmix, "cutmix_batch", lambda *a, **k: calls.append(1) or original(*a, **k))
        cfg, _ = parse_command_line(["--model.arch", "resnet18", "--data.num_classes", "3", "--optim.epochs", "2",
                                     "--optim.warmup.epochs", "1", "--data.cutmix.prob", "1",
                                     "--data.cutmix.beta", "1", "--data.cutmix.off_epoch", "1",
                                     "--optim.label_smoothing", "0.1", "--util.progress", "False"])
        env = init_distributed("cpu")
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(4, 3))
        optimizer = build_optimizer(cfg, model)
        loader = synthetic_batches(3)
        schedule = build_schedule(cfg, optimizer, steps_per_epoch=len(loader))
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        before = [p.detach().clone() for p in model.parameters()]
        stats = [train_one_epoch(model, loader, optimizer, schedule, scaler, cfg, e, env) for e in range(2)]
        assert len(calls) == 3  # epoch 0 only: CutMix is off for the last epoch
        assert schedule.step_count == 6
        peak = optimizer.param_groups[0]["peak_lr"]
        assert optimizer.param_groups[0]["lr"] == pytest.approx(
            lr_at(5, peak_lr=peak, total_steps=6, warmup_steps=3, warmup_lr=0.0))
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert all(np.isfinite(s["loss"]) and 0 <= s["data_wait_fraction"] <= 1 for s in stats)

    def test_float16_images_without_autocast(self):
        # data.dtype float16 on the CPU (no autocast there) or with compute.amp none: the images
        # are cast to the float32 of the weights, in training and in evaluation.
        from relabel_dali.train.engine import evaluate, train_one_epoch
        from relabel_dali.train.optim import build_optimizer, build_schedule

        cfg, _ = parse_command_line(["--data.num_classes", "3", "--util.progress", "False", "--data.dtype", "float16",
                                     "--compute.amp", "none"])
        env = init_distributed("cpu")
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(4, 3))
        optimizer = build_optimizer(cfg, model)
        loader = ListLoader({**batch, "images": batch["images"].half()} for batch in synthetic_batches(2))
        schedule = build_schedule(cfg, optimizer, steps_per_epoch=len(loader))
        stats = train_one_epoch(model, loader, optimizer, schedule, torch.amp.GradScaler("cuda", enabled=False),
                                cfg, 0, env)
        assert np.isfinite(stats["loss"])
        assert evaluate(model, loader, cfg, env)["samples"] == 8

    @pytest.mark.parametrize("device,amp,expected", [("cpu", "bf16", False), ("cpu", "none", False),
                                                     ("cuda", "none", False), ("cuda", "bf16", True),
                                                     ("cuda", "fp16", True)])
    def test_autocast_only_on_the_gpu(self, device, amp, expected):
        from relabel_dali.train.engine import autocast_enabled

        assert autocast_enabled(torch.device(device), amp) is expected

    def test_loader_shorter_than_len(self):
        from relabel_dali.train.engine import train_one_epoch
        from relabel_dali.train.optim import build_optimizer, build_schedule

        class Short(ListLoader):
            def __len__(self):
                return 5

        cfg, _ = parse_command_line(["--data.num_classes", "3", "--util.progress", "False"])
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
        model(torch.zeros(1, 3, 16, 16))
        optimizer = build_optimizer(cfg, model)
        schedule = build_schedule(cfg, optimizer, steps_per_epoch=5)
        with pytest.raises(RuntimeError, match="train loader ended after 2 of its 5 batches"):
            train_one_epoch(model, Short(synthetic_batches(2)), optimizer, schedule,
                            torch.amp.GradScaler("cuda", enabled=False), cfg, 0, init_distributed("cpu"))


class TestHalfImages:
    def test_float16_images_on_the_cpu(self, tiny, tmp_path):
        # The CPU has no autocast: float16 images are cast to the weights' float32.
        argv = argv_for(tiny, tmp_path, "--data.dtype", "float16", "--optim.epochs", "1")
        assert train.main(argv) == 0
        assert np.isfinite(torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)["metrics"]["top1"])


@pytest.mark.gpu
class TestGpu:
    def test_float16_images_without_amp(self, tiny, tmp_path):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
        argv = argv_for(tiny, tmp_path, "--compute.device", "cuda", "--compute.amp", "none",
                        "--data.dtype", "float16", "--data.start_method", "spawn", "--optim.epochs", "1")
        assert train.main(argv) == 0

    @pytest.mark.parametrize("amp", ["bf16", "fp16"])
    def test_amp_channels_last_and_resume(self, tiny, tmp_path, amp):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
        argv = argv_for(tiny, tmp_path, "--compute.device", "cuda", "--compute.amp", amp,
                        "--data.start_method", "spawn")
        assert train.main(argv) == 0
        state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
        assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                           if v.is_floating_point())
        assert train.main(argv + ["--optim.epochs", "3", "--resume", "auto"]) == 0
        assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)["epoch"] == 3
