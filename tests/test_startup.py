"""What a ``train.py`` process loads and does at start-up and exit, which every process of a
multi-node run pays for: importing the trainer loads neither torchvision (with its ops and, through
RoIAlign, TorchDynamo) nor timm, TensorBoard, matplotlib or DALI; building a torchvision model does
not load TorchDynamo; the garbage collector leaves the imported modules out of its passes during a
run and at exit (``gc.freeze``), and a process that runs ``main`` finds the collector as it was."""
import gc
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from conftest import argv_for
from relabel_dali.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
# Loaded at start-up, they cost seconds per process (TorchDynamo alone about as long as torch).
HEAVY = ("torch._dynamo", "torchvision", "torchvision.ops", "timm", "tensorboard", "torch.utils.tensorboard",
         "matplotlib", "nvidia.dali", "sympy")


def python(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter in the checkout; it prints one JSON object last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def loaded(modules) -> str:
    return f"[name for name in {tuple(modules)!r} if name in sys.modules]"


def test_a_torchvision_model_is_built_without_torchdynamo(tiny, tmp_path):
    """``build_model`` imports torchvision with a stand-in for ``torch._dynamo.utils``, gone once
    torchvision is in; RoIAlign gets the real ``is_compile_supported`` when it first calls it."""
    result = python(f"""
        import json, sys, torch
        from relabel_dali.config import parse_command_line
        from relabel_dali.train.models import build_model
        cfg, _ = parse_command_line({argv_for(tiny, tmp_path)!r})
        model = build_model(cfg)
        before = {loaded(("torch._dynamo", "torch._dynamo.utils", "torchvision", "torchvision.ops"))}
        roi_align = sys.modules["torchvision.ops.roi_align"]
        supported = roi_align.is_compile_supported("cpu")
        from torch._dynamo.utils import is_compile_supported
        boxes = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0]])
        pooled = roi_align.roi_align(torch.arange(64.0).view(1, 1, 8, 8), boxes, 2, aligned=True)
        print(json.dumps({{"before": before, "type": type(model).__name__, "supported": supported,
                          "real": is_compile_supported("cpu"), "after": {loaded(("torch._dynamo",))},
                          "pooled": pooled.flatten().tolist()}}))
    """)
    assert result["before"] == ["torchvision", "torchvision.ops"] and result["type"] == "MobileNetV3"
    assert result["supported"] == result["real"] and result["after"] == ["torch._dynamo"]
    # 8 y + x is linear, so each of the box's quarters averages to its value at the quarter's centre
    assert result["pooled"] == pytest.approx([13.75, 16.25, 29.75, 32.25])


def test_torchvision_after_torchdynamo_is_a_plain_import():
    """Where ``torch._dynamo.utils`` is loaded already (here a module that stands for it), torchvision
    takes from it what it takes."""
    result = python("""
        import json, sys, types
        loaded = types.ModuleType("torch._dynamo.utils")
        loaded.is_compile_supported = lambda device_type: "the loaded one"
        sys.modules["torch._dynamo.utils"] = loaded
        from relabel_dali.train.models import import_torchvision
        import_torchvision()
        print(json.dumps({"taken": sys.modules["torchvision.ops.roi_align"].is_compile_supported("cpu"),
                          "still": sys.modules["torch._dynamo.utils"] is loaded}))
    """)
    assert result == {"taken": "the loaded one", "still": True}


def test_trainer_imports_nothing_heavy_and_collector_skips_the_modules(tiny, tmp_path):
    """In a process of its own: importing the trainer loads none of ``HEAVY``; during ``run`` the
    objects loaded before it are frozen, with the modules the run imports anyway (torchvision for
    this model, TorchDynamo for the optimizer); after it nothing is; at exit everything is, before the
    exit handlers registered during the run run (DALI's, which collects garbage once more)."""
    result = python(f"""
        import atexit, gc, json, sys
        import train
        from relabel_dali.train import checkpoint, engine, models, optim
        from relabel_dali.config import ConfigError
        seen = {{"heavy": {loaded(HEAVY)}}}
        atexit.register(lambda: print(json.dumps({{**seen, "at_exit": gc.get_freeze_count() > 0}}), flush=True))

        def frozen(module):  # gc.get_objects lists what the collector goes over: the frozen ones not
            namespace = sys.modules[module].__dict__
            return gc.is_tracked(namespace) and not any(o is namespace for o in gc.get_objects())

        def build_data(*args, **kwargs):
            seen["during_run"] = gc.get_freeze_count() > 0
            seen["frozen"] = [name for name in ("torch", "torchvision", "torch._dynamo") if frozen(name)]
            atexit.register(lambda: seen.setdefault("handler_of_the_run", gc.get_freeze_count() > 0))
            raise ConfigError("stopped here")

        train.build_data = build_data
        seen["code"] = train.main({argv_for(tiny, tmp_path)!r})
        seen["after_run"] = gc.get_freeze_count()
        seen["main_twice"] = train.main({argv_for(tiny, tmp_path)!r})
    """)
    assert result == {"heavy": [], "code": 2, "during_run": True, "frozen": ["torch", "torchvision", "torch._dynamo"],
                      "after_run": 0, "main_twice": 2,
                      "handler_of_the_run": True, "at_exit": True}


def test_main_leaves_the_collector_as_found(tiny, tmp_path, monkeypatch):
    """In this process: ``main`` unfreezes what it froze, whatever ended the run."""
    import train

    def build_data(*args, **kwargs):
        assert gc.get_freeze_count() > 0
        raise ConfigError("stopped here")

    monkeypatch.setattr(train, "build_data", build_data)
    assert gc.get_freeze_count() == 0
    assert train.main(argv_for(tiny, tmp_path)) == 2
    assert gc.get_freeze_count() == 0


def test_bench_startup_reports_each_case(tmp_path):
    """``tools/bench_startup.py``, on its cheapest case: the JSON report names the tree, the commit,
    the host and the load, with a median per case."""
    report_path = tmp_path / "startup.json"
    done = subprocess.run([sys.executable, "tools/bench_startup.py", "--only", "config_error", "--repeats", "1",
                           "--json", str(report_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["tree"] == str(REPO) and report["commit"] and report["cpus"] >= 1 and report["repeats"] == 1
    (case,) = report["cases"].values()
    assert list(report["cases"]) == ["config_error"] and case["wall_s"] > 0 and case["cpu_s"] > 0
    assert len(case["load_1min"]) == len(case["runs"]) == 1 and "config_error" in done.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


class TestExitWithNanobind:
    """At exit, the objects alive are left out of the collector's last passes, except where an
    extension built with nanobind is loaded (triton 3.9, torch 2.15): nanobind then reports every
    object the passes skipped as a leak, hundreds of lines per process."""

    @staticmethod
    def with_extension(monkeypatch, value):
        extension = types.ModuleType("fake_extension")
        extension.__file__ = "/site-packages/fake_extension.cpython-311-x86_64-linux-gnu.so"
        extension.thing = value
        monkeypatch.setitem(sys.modules, "fake_extension", extension)

    def test_a_nanobind_function_or_class_is_recognised(self, monkeypatch):
        import train

        plain = train.nanobind_loaded()
        nb_func = type("nb_func", (), {})
        self.with_extension(monkeypatch, nb_func())
        assert train.nanobind_loaded()
        monkeypatch.undo()
        nb_type = type("nb_type", (type,), {})
        bound = nb_type("Bound", (), {})
        for value in (bound, bound()):  # a bound class, a constant of one
            self.with_extension(monkeypatch, value)
            assert train.nanobind_loaded()
            monkeypatch.undo()
        self.with_extension(monkeypatch, len)  # a builtin function of an ordinary extension
        assert train.nanobind_loaded() == plain

    def test_only_a_python_module_with_such_names_is_not_an_extension(self, monkeypatch):
        import train

        plain = train.nanobind_loaded()
        self.with_extension(monkeypatch, type("nb_func", (), {})())
        sys.modules["fake_extension"].__file__ = "/site-packages/fake_extension.py"
        assert train.nanobind_loaded() == plain

    @pytest.mark.parametrize("nanobind", [False, True])
    def test_exit_freezes_unless_nanobind_is_loaded(self, monkeypatch, nanobind):
        import train

        monkeypatch.setattr(train, "nanobind_loaded", lambda: nanobind)
        assert gc.get_freeze_count() == 0
        try:
            train.skip_final_collection()
            assert (gc.get_freeze_count() > 0) is not nanobind
        finally:
            gc.unfreeze()
