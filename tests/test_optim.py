"""Optimizers, weight-decay groups and the per-iteration warm-up + cosine schedule."""
import importlib.util
import numpy as np
import pytest
import torch

from relabel_dali.config import load_config
from relabel_dali.train.optim import WarmupDecaySchedule, build_optimizer, build_schedule, lr_at, param_groups, scaled_lr


def reference_lrs(peak, warmup_lr, steps_per_epoch, epochs, warmup_epochs, decay):
    """The official formulas, written per (epoch, iteration) as its trainer indexes them."""
    out = []
    for epoch in range(epochs):
        for it in range(steps_per_epoch):
            if epoch < warmup_epochs:
                out.append(warmup_lr + (peak - warmup_lr) * (it + epoch * steps_per_epoch)
                           / (warmup_epochs * steps_per_epoch))
                continue
            t = (it + (epoch - warmup_epochs) * steps_per_epoch) / ((epochs - warmup_epochs) * steps_per_epoch)
            out.append(peak * (0.5 * (np.cos(np.pi * t) + 1) if decay == "cos" else 1 - t))
    return np.array(out)


def tiny_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(5))


class TestSchedule:
    @pytest.mark.parametrize("decay", ["cos", "linear"])
    @pytest.mark.parametrize("steps_per_epoch, epochs, warmup_epochs", [(7, 10, 2), (3, 4, 0), (1, 300, 5)])
    def test_matches_official_formula(self, decay, steps_per_epoch, epochs, warmup_epochs):
        got = [lr_at(s, peak_lr=0.4, total_steps=steps_per_epoch * epochs,
                     warmup_steps=steps_per_epoch * warmup_epochs, warmup_lr=0.01, decay_type=decay)
               for s in range(steps_per_epoch * epochs)]
        np.testing.assert_allclose(got, reference_lrs(0.4, 0.01, steps_per_epoch, epochs, warmup_epochs, decay),
                                   rtol=1e-12, atol=1e-15)

    def test_sets_every_group_and_resumes(self):
        model = torch.nn.Linear(3, 2)
        groups = [{"params": [model.weight], "lr": 0.2}, {"params": [model.bias], "lr": 0.1}]
        optimizer = torch.optim.SGD(groups, lr=0.2)
        schedule = WarmupDecaySchedule(optimizer, steps_per_epoch=5, epochs=4, warmup_epochs=1, warmup_lr=0.0)
        seen = [(schedule.step(), optimizer.param_groups[1]["lr"]) for _ in range(8)]
        for step, (lr0, lr1) in enumerate(seen):
            assert lr0 == pytest.approx(lr_at(step, peak_lr=0.2, total_steps=20, warmup_steps=5, warmup_lr=0.0))
            assert lr1 == pytest.approx(lr0 / 2)
        other = WarmupDecaySchedule(torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.2),
                                    steps_per_epoch=5, epochs=4, warmup_epochs=1, warmup_lr=0.0)
        other.load_state_dict(schedule.state_dict())
        assert other.step() == pytest.approx(schedule.step())

    def test_reaches_zero_at_the_end(self):
        last = lr_at(99, peak_lr=1.0, total_steps=100, warmup_steps=10, warmup_lr=0.0)
        assert 0 < last < 1e-3 and lr_at(100, peak_lr=1.0, total_steps=100, warmup_steps=10, warmup_lr=0.0) == 0

    @pytest.mark.parametrize("kwargs, message", [
        (dict(steps_per_epoch=0, epochs=3, warmup_epochs=1, warmup_lr=0.0), "steps_per_epoch must be >= 1"),
        (dict(steps_per_epoch=2, epochs=3, warmup_epochs=4, warmup_lr=0.0), r"optim\.warmup\.epochs 4"),
        (dict(steps_per_epoch=2, epochs=3, warmup_epochs=1, warmup_lr=0.0, decay_type="step"),
         r"optim\.lr\.decay_type 'step'"),
    ])
    def test_bad_settings(self, kwargs, message):
        optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        with pytest.raises(ValueError, match=message):
            WarmupDecaySchedule(optimizer, **kwargs)

    def test_built_from_config(self):
        cfg = load_config(overrides={"optim.epochs": "4", "optim.warmup.epochs": "1"})
        optimizer = build_optimizer(cfg, torch.nn.Linear(2, 2))
        schedule = build_schedule(cfg, optimizer, steps_per_epoch=3)
        assert (schedule.total_steps, schedule.warmup_steps) == (12, 3)


class TestOptimizers:
    @pytest.mark.parametrize("batch, base, init", [(1024, 1024, 0.1), (256, 1024, 0.1), (4096, 256, 0.05)])
    def test_linear_lr_scaling(self, batch, base, init):
        cfg = load_config(overrides={"optim.batch_size": str(batch), "optim.lr.base_batch_size": str(base),
                                     "optim.lr.init": str(init)})
        assert scaled_lr(cfg) == pytest.approx(init * batch / base)
        assert build_optimizer(cfg, torch.nn.Linear(2, 2)).param_groups[0]["lr"] == pytest.approx(init * batch / base)

    @pytest.mark.parametrize("exclude", [True, False])
    def test_no_decay_on_norm_and_bias(self, exclude):
        model = tiny_model()
        model(torch.zeros(1, 3, 5, 5))
        groups = param_groups(model, 1e-4, exclude)
        decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        expected = {id(p) for p in model.parameters() if p.ndim > 1 or not exclude}
        assert decayed == expected
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    @pytest.mark.parametrize("exclude", [True, False])
    def test_timm_no_weight_decay_names_are_excluded(self, exclude):
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3)
        groups = param_groups(model, 0.05, exclude)
        decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        names = {name for name, p in model.named_parameters() if id(p) in decayed}
        assert ("pos_embed" in names, "cls_token" in names) == (not exclude, not exclude)
        assert "blocks.0.attn.qkv.weight" in names and ("blocks.0.norm1.weight" in names) == (not exclude)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    def test_sgd_settings(self):
        cfg = load_config(overrides={"optim.optimizer": "sgd", "optim.momentum": "0.8", "optim.nesterov": "True"})
        optimizer = build_optimizer(cfg, torch.nn.Linear(2, 2))
        assert isinstance(optimizer, torch.optim.SGD)
        assert (optimizer.defaults["momentum"], optimizer.defaults["nesterov"]) == (0.8, True)

    def test_adamw(self):
        cfg = load_config(overrides={"optim.optimizer": "adamw", "optim.wd.base": "0.05"})
        optimizer = build_optimizer(cfg, torch.nn.Linear(2, 2))
        assert isinstance(optimizer, torch.optim.AdamW)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]

    @pytest.mark.skipif(importlib.util.find_spec("adamp") is not None, reason="adamp is installed here")
    def test_adamp_missing_names_the_package(self):
        cfg = load_config(overrides={"optim.optimizer": "adamp"})
        with pytest.raises(ImportError, match="pip install adamp"):
            build_optimizer(cfg, torch.nn.Linear(2, 2))

    def test_unknown_optimizer(self):
        cfg = load_config(overrides={"optim.optimizer": "lion"})
        with pytest.raises(ValueError, match=r"optim\.optimizer 'lion' is not one of"):
            build_optimizer(cfg, torch.nn.Linear(2, 2))

    def test_no_warmup_starts_at_peak(self):
        assert lr_at(0, peak_lr=0.1, total_steps=10, warmup_steps=0, warmup_lr=0.0) == 0.1
