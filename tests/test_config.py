"""Config: YAML defaults <- config file <- dotted command-line flags; casts, unknown keys, saving."""
from pathlib import Path

import pytest
import yaml

from relabel_dali.config import ConfigError, load_config, parse_command_line, save_config, to_plain

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


class TestConfigFiles:
    def test_base_holds_the_official_keys(self):
        cfg = load_config()
        for key in ("model.arch", "data.image_size", "data.rrc_minimum", "data.crop_ratio", "data.relabel.use",
                    "data.relabel.path", "data.cutmix.prob", "data.cutmix.beta", "data.cutmix.off_epoch",
                    "optim.optimizer", "optim.epochs", "optim.bn.momentum", "optim.bn.eps", "optim.batch_size",
                    "optim.lr.init", "optim.lr.decay_type", "optim.warmup.lr", "optim.warmup.epochs",
                    "optim.nesterov", "optim.momentum", "optim.wd.base", "optim.label_smoothing",
                    "util.print_freq", "util.val_batch_size", "util.test_only", "util.test_weight_file"):
            cfg.get_path(key)  # raises KeyError when missing

    @pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
    def test_every_shipped_config_loads(self, path):
        raw = yaml.safe_load(path.read_text())
        cfg = load_config(path)
        # Every value the file sets wins over the default.
        def check(tree, prefix=""):
            for key, value in tree.items():
                if isinstance(value, dict) and value:
                    check(value, f"{prefix}{key}.")
                else:
                    assert cfg.get_path(f"{prefix}{key}") == value
        check(raw)

    @pytest.mark.parametrize("name, expected", [
        ("relabel_train_resnet50.yaml", {"optim.optimizer": "sgd", "optim.lr.init": 0.1, "optim.wd.base": 1e-4,
                                         "optim.epochs": 300, "optim.warmup.epochs": 5, "optim.nesterov": True,
                                         "data.relabel.use": True, "data.cutmix.prob": 0.0}),
        ("relabel_train_resnet50_cutmix.yaml", {"optim.optimizer": "adamp", "optim.lr.init": 2e-3,
                                                "optim.wd.base": 1e-2, "data.cutmix.prob": 1.0,
                                                "data.cutmix.beta": 1.0, "data.cutmix.off_epoch": 5}),
        ("baseline_resnet50.yaml", {"data.relabel.use": False, "optim.epochs": 300}),
        ("demo.yaml", {"compute.device": "cpu", "data.class_map": "folder", "data.num_classes": 19}),
    ])
    def test_recipes(self, name, expected):
        cfg = load_config(CONFIGS_DIR / name)
        assert {key: cfg.get_path(key) for key in expected} == expected

    def test_file_overrides_only_what_it_names(self, tmp_path):
        cfg = load_config(write_yaml(tmp_path / "c.yaml", {"optim": {"lr": {"init": 0.3}}}))
        base = load_config()
        assert cfg.optim.lr.init == 0.3
        assert cfg.optim.lr.decay_type == base.optim.lr.decay_type
        assert cfg.optim.epochs == base.optim.epochs

    def test_int_in_file_is_accepted_for_float(self, tmp_path):
        cfg = load_config(write_yaml(tmp_path / "c.yaml", {"optim": {"lr": {"init": 1}}}))
        assert cfg.optim.lr.init == 1.0 and isinstance(cfg.optim.lr.init, float)

    def test_unknown_key_in_file_names_closest(self, tmp_path):
        path = write_yaml(tmp_path / "c.yaml", {"optim": {"lr": {"innit": 0.3}}})
        with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'optim\.lr\.innit'; did you mean 'optim\.lr\.init'"):
            load_config(path)

    def test_wrong_type_in_file(self, tmp_path):
        path = write_yaml(tmp_path / "c.yaml", {"optim": {"epochs": "many"}})
        with pytest.raises(ConfigError, match=r"optim\.epochs is 'many' \(str\), expected int"):
            load_config(path)

    def test_value_for_a_section(self, tmp_path):
        path = write_yaml(tmp_path / "c.yaml", {"optim": {"lr": 0.1}})
        with pytest.raises(ConfigError, match=r"optim\.lr is a section"):
            load_config(path)

    @pytest.mark.parametrize("text, message", [("[1, 2]", "expected a mapping"), ("a: [", "not valid YAML")])
    def test_malformed_file(self, tmp_path, text, message):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)

    def test_missing_file(self, tmp_path):
        with pytest.raises(ConfigError, match="does not exist"):
            load_config(tmp_path / "nope.yaml")


class TestCommandLine:
    @pytest.mark.parametrize("key, raw, expected", [
        ("optim.epochs", "300", 300),
        ("optim.lr.init", "0.5", 0.5),
        ("optim.lr.init", "1", 1.0),
        ("optim.wd.base", "1e-2", 0.01),
        ("util.test_only", "True", True),
        ("util.test_only", "true", True),
        ("util.test_only", "1", True),
        ("util.test_only", "False", False),
        ("util.test_only", "0", False),
        ("data.relabel.path", "/data/shards", "/data/shards"),
        ("data.real_labels", "real.json", "real.json"),
        ("data.real_labels", "None", None),
        ("util.test_weight_file", "null", None),
        ("model.kwargs", "{width_mult: 0.5}", {"width_mult": 0.5}),
    ])
    def test_cast_to_the_default_type(self, key, raw, expected):
        cfg, _ = parse_command_line([f"--{key}", raw])
        value = cfg.get_path(key)
        assert value == expected and isinstance(value, type(expected))

    def test_equals_form_and_precedence_over_file(self, tmp_path):
        path = write_yaml(tmp_path / "c.yaml", {"optim": {"epochs": 7, "lr": {"init": 0.3}}})
        cfg, resume = parse_command_line(["--config-file-path", str(path), "--optim.epochs=9", "--resume", "auto"])
        assert (cfg.optim.epochs, cfg.optim.lr.init, resume) == (9, 0.3, "auto")

    def test_unknown_key_names_closest(self):
        with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lr\.int'; did you mean 'optim\.lr\.init'"):
            parse_command_line(["--optim.lr.int", "0.1"])

    def test_section_is_not_a_key(self):
        with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lr'"):
            parse_command_line(["--optim.lr", "0.1"])

    @pytest.mark.parametrize("argv, message", [
        (["--util.test_only", "maybe"], r"--util\.test_only 'maybe' is not a valid bool"),
        (["--optim.epochs", "3.5"], r"--optim\.epochs '3\.5' is not a valid int"),
        (["--optim.lr.init", "fast"], r"--optim\.lr\.init 'fast' is not a valid float"),
        (["--model.kwargs", "[1, 2]"], r"parses to list, expected a YAML dict"),
        (["--optim.epochs"], r"--optim\.epochs needs a value"),
        (["configs/demo.yaml"], r"unexpected argument 'configs/demo\.yaml'"),
    ])
    def test_bad_flags(self, argv, message):
        with pytest.raises(ConfigError, match=message):
            parse_command_line(argv)


class TestSaveConfig:
    def test_round_trip(self, tmp_path):
        cfg, _ = parse_command_line(["--optim.epochs", "11", "--model.kwargs", "{width_mult: 0.5}",
                                     "--data.real_labels", "r.json"])
        save_config(cfg, tmp_path / "config.yaml")
        again = load_config(tmp_path / "config.yaml")
        assert to_plain(again) == to_plain(cfg)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temp file left


class TestDictValuedKeys:
    def test_set_by_a_file_and_again_on_the_command_line(self, tmp_path):
        from relabel_dali.config import load_config

        (tmp_path / "c.yaml").write_text("model:\n  kwargs: {width_mult: 0.5}\n")
        cfg = load_config(tmp_path / "c.yaml", [("model.kwargs", "{width_mult: 0.25}"),
                                                ("model.kwargs", "{dropout: 0.1}")])
        assert cfg.model.kwargs == {"dropout": 0.1}
