"""Methods from outside the package (promptclip.methods.plugins): a throw-away installed package (entry point) and a
plugin file, each through the CLI (train -> eval -> predict -> run grid); adapters name their plugin; presets shipped
on the class and as YAML files; cluster jobs load the plugin; clear errors for broken plugins."""

import json
import sys
import textwrap
from pathlib import Path

import pytest

from promptclip.cli import main
from promptclip.data import load_splits
from promptclip.methods import base, list_methods, load_plugin, method_source, plugins
from promptclip.presets import default_preset, list_presets, load_preset

FAST = ["--backbone", "tiny", "--quiet"]
SAMPLE = ["--dataset", "eurosat-sample"]

TOY = textwrap.dedent('''
    """Toy plugin: a learned shift of the image features."""
    from dataclasses import dataclass

    import torch
    from torch import nn

    from promptclip.methods import PromptMethod
    from promptclip.methods.base import cosine_logits
    from promptclip.methods.prompts import encode_texts


    @dataclass
    class ToyConfig:
        scale: float = 0.5


    class ToyShift(PromptMethod):
        """A learned shift of the image features (test plugin)."""

        name = "toy_shift"
        config_class = ToyConfig
        image_independent_text = True
        presets = {"default": {"backbone": "tiny",
                               "train": {"batch_size": 8, "lr": 0.01, "max_epoch": 1, "precision": "fp32"}}}

        def __init__(self, backbone, config, classnames, template=None):
            super().__init__(backbone, config, classnames, template)
            self.shift = nn.Parameter(torch.zeros(backbone.config.embed_dim))
            self.register_buffer("text", torch.empty(0), persistent=False)
            self.set_classnames(classnames, template)

        def rebuild_class_buffers(self):
            template = self.template or "a photo of a {}."
            self.text = encode_texts(self.clip, [template.format(c) for c in self.classnames])

        def encode_classes(self):
            return self.text

        def forward(self, batch):
            features = self.clip.encode_image(batch["image"])
            return cosine_logits(self.clip, features + self.config.scale * self.shift, self.class_features())
''')


def json_out(text: str):
    return json.loads(text[text.index("{") if text.lstrip().startswith("{") else text.index("["):])


def forget(name: str) -> None:
    """What a new process without the plugin sees: the method is not registered."""
    base._REGISTRY.pop(name, None)
    plugins._SOURCES.pop(name, None)


@pytest.fixture
def toy_package(tmp_path, monkeypatch, isolated_registry):
    """An 'installed' distribution toyplug 0.1 declaring method toy_shift (a dist-info folder on sys.path)."""
    site = tmp_path / "site"
    (site / "toyplug").mkdir(parents=True)
    (site / "toyplug" / "__init__.py").write_text(TOY)
    info = site / "toyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[promptclip.methods]\ntoy_shift = toyplug:ToyShift\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("toyplug", None)


@pytest.fixture
def toy_file(tmp_path, isolated_registry) -> Path:
    path = tmp_path / "plugin" / "toy.py"
    path.parent.mkdir()
    path.write_text(TOY)
    return path


def test_installed_plugin_trains_evaluates_predicts_and_runs_a_grid(toy_package, tmp_path, capsys, monkeypatch):
    assert "toy_shift" in list_methods()  # listed from its entry point, before anything imports it
    assert "toyplug" not in sys.modules
    run = tmp_path / "train"
    assert main(["train", "--method", "toy_shift", *SAMPLE, "--subsample", "base", *FAST, "--out", str(run)]) == 0
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["method_source"] == {"kind": "entry_point", "spec": "toyplug:ToyShift", "distribution": "toyplug",
                                     "version": "0.1"}
    assert meta["train"]["batch_size"] == 8  # the preset shipped on the class is the default
    assert (run / "metrics.jsonl").exists()
    capsys.readouterr()

    assert main(["eval", "--adapter", str(run), *SAMPLE, "--subsample", "new", "--quiet"]) == 0
    summary = json_out(capsys.readouterr().out)
    assert summary["method"] == "toy_shift" and summary["num_samples"] == 150

    images = [r.path for r in load_splits("eurosat-sample").test[:2]]
    assert main(["predict", *images, "--adapter", str(run), "--format", "json", "--top-k", "2", "--quiet"]) == 0
    rows = json_out(capsys.readouterr().out)
    assert [row["path"] for row in rows] == images
    assert {p["label"] for row in rows for p in row["predictions"]} <= set(meta["classnames"])

    grid = tmp_path / "grid"
    assert main(["run", "base2novel", "--methods", "toy_shift", "--datasets", "eurosat-sample", "--seeds", "1",
                 *FAST, "--out", str(grid), "--no-plots"]) == 0
    records = [json.loads(line) for line in (grid / "records.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["split"]) for r in records) == [("toy_shift", "base"), ("toy_shift", "novel")]
    run_dir = Path(records[0]["run_dir"])
    assert json.loads((run_dir / "config.json").read_text())["preset"]["name"] == "toy_shift/default"

    # Uninstalled: loading its adapter says which package to install, before any weights load.
    monkeypatch.syspath_prepend(str(tmp_path))  # (a path change: importlib's caches are invalidated)
    sys.path.remove(str(toy_package))
    forget("toy_shift")
    sys.modules.pop("toyplug", None)
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), *SAMPLE, "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "installed package toyplug 0.1" in err and "entry point toyplug:ToyShift" in err


def test_plugin_file_through_the_cli_with_a_yaml_preset(toy_file, tmp_path, capsys):
    run = tmp_path / "train"
    argv = ["train", "--method", f"{toy_file}:ToyShift", *SAMPLE, "--subsample", "base", "--shots", "4", *FAST,
            "--out", str(run)]
    assert main(argv) == 0
    spec = f"{toy_file.resolve()}:ToyShift"
    assert json.loads((run / "adapter.json").read_text())["method_source"] == {"kind": "plugin", "spec": spec}

    forget("toy_shift")  # a new process that was not given the plugin
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), *SAMPLE, "--subsample", "new", "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--plugin {spec}" in err
    assert main(["eval", "--plugin", str(toy_file), "--adapter", str(run), *SAMPLE, "--subsample", "new",
                 "--quiet"]) == 0
    assert json_out(capsys.readouterr().out)["method"] == "toy_shift"

    preset = tmp_path / "toy.yaml"
    preset.write_text("method: toy_shift\nmethod_config: {scale: 0.25}\n"
                      "train: {batch_size: 4, lr: 0.02, max_epoch: 1, precision: fp32}\n")
    grid = tmp_path / "grid"
    assert main(["run", "fewshot", "--plugin", str(toy_file), "--methods", "toy_shift", "--preset",
                 f"toy_shift={preset}", "--shots", "2", "--datasets", "eurosat-sample", "--seeds", "1", *FAST,
                 "--out", str(grid), "--no-report"]) == 0
    record = json.loads((grid / "records.jsonl").read_text().splitlines()[0])
    config = json.loads((Path(record["run_dir"]) / "config.json").read_text())["preset"]
    assert config["name"] == str(preset)
    assert config["method_config"] == {"scale": 0.25} and config["train"]["batch_size"] == 4


def test_cluster_jobs_load_the_plugin_of_their_cell(toy_file, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cluster"
    assert main(["run", "fewshot", "--plugin", str(toy_file), "--methods", "toy_shift", "--shots", "1",
                 "--datasets", "eurosat-sample", "--seeds", "1", *FAST, "--out", str(out), "--no-report",
                 "--executor", "submitit-local"]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [(r["method"], r["shots"]) for r in records] == [("toy_shift", 1)]
    assert (Path(records[0]["run_dir"]) / "adapter.safetensors").exists()


def test_presets_and_listing_of_a_plugin(toy_file, capsys):
    assert load_plugin(str(toy_file)) == ["toy_shift"]
    assert load_plugin(f"{toy_file}:ToyShift") == ["toy_shift"]  # loading again (or by class) is harmless
    assert "toy_shift/default" in list_presets()
    assert default_preset("base2novel", "toy_shift") == "toy_shift/default"
    preset = load_preset("toy_shift/default")
    assert preset.method == "toy_shift" and preset.train.batch_size == 8
    assert main(["list", "methods"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("toy_shift"))
    assert "A learned shift of the image features" in line and f"plugin: {toy_file.resolve()}:ToyShift" in line
    assert method_source("coop").kind == "builtin"


def test_a_method_without_presets_trains_with_the_engine_defaults_and_one_warning(toy_file, tmp_path, capsys):
    toy_file.write_text(TOY.replace("presets = {", "unused = {"))
    out = tmp_path / "run"
    assert main(["train", "--plugin", str(toy_file), "--method", "toy_shift", *SAMPLE, *FAST, "--shots", "1",
                 "--set", "train.max_epoch=1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "'toy_shift' has no presets" in warned[0], err
    assert "batch_size 32, lr 0.002, max_epoch 10" in warned[0]  # TrainConfig's documented defaults
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["config"] == {"scale": 0.5}
    assert meta["train"]["lr"] == 0.002 and meta["train"]["batch_size"] == 32 and meta["train"]["max_epoch"] == 1
    assert load_preset("toy_shift/engine_defaults").train.max_epoch == 10


def test_a_method_whose_presets_lack_the_protocol_and_default_names_them(toy_file):
    toy_file.write_text(TOY.replace('presets = {"default":', 'presets = {"short":'))
    load_plugin(str(toy_file))
    from promptclip.errors import ConfigError

    with pytest.raises(ConfigError, match="no preset for 'fewshot' and no 'default' one .it has short."):
        default_preset("fewshot", "toy_shift")


COOP_VARIANT = textwrap.dedent('''
    """A CoOp variant with one extra parameter and no presets of its own (test plugin)."""
    from dataclasses import dataclass

    from promptclip.methods.coop import CoOp, CoOpConfig


    @dataclass
    class ScaledCoOpConfig(CoOpConfig):
        scale: float = 1.0


    class ScaledCoOp(CoOp):
        """CoOp with a scale (test plugin)."""

        name = "scaled_coop"
        config_class = ScaledCoOpConfig
''')


def test_an_installed_coop_subclass_inherits_coops_presets_and_trains(tmp_path, monkeypatch, isolated_registry,
                                                                       capsys):
    site = tmp_path / "site"
    (site / "scaledcoop").mkdir(parents=True)
    (site / "scaledcoop" / "__init__.py").write_text(COOP_VARIANT)
    info = site / "scaledcoop-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scaledcoop\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[promptclip.methods]\nscaled_coop = scaledcoop:ScaledCoOp\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        assert default_preset("fewshot", "scaled_coop", "eurosat", 16) == "scaled_coop/vit_b16"
        assert default_preset("base2novel", "scaled_coop") == "scaled_coop/vit_b16_ctxv1"
        preset = load_preset("scaled_coop/vit_b16_ep50")
        assert preset.method == "scaled_coop" and preset.train.max_epoch == 50  # CoOp's coop/vit_b16_ep50.yaml
        assert "inherited from coop/vit_b16_ep50" in preset.source
        capsys.readouterr()
        assert main(["list", "presets"]) == 0
        listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("scaled_coop/vit_b16_ep50 ")]
        assert len(listed) == 1 and listed[0].endswith("[inherited from coop/vit_b16_ep50]")
        out = tmp_path / "run"
        assert main(["train", "--method", "scaled_coop", *SAMPLE, *FAST, "--shots", "1", "--set", "train.max_epoch=1",
                     "--set", "method_config.scale=2e0", "--out", str(out)]) == 0
        meta = json.loads((out / "adapter.json").read_text())
        assert meta["method"] == "scaled_coop" and meta["config"]["scale"] == 2.0 and meta["config"]["n_ctx"] == 16
        assert "warning:" not in capsys.readouterr().err
    finally:
        sys.modules.pop("scaledcoop", None)


@pytest.mark.parametrize("source, spec, message", [
    (None, "missing.py:ToyShift", "does not exist"),
    ("def broken(:\n", "{file}", "failed to import: SyntaxError"),
    ("import torch\n", "{file}", "defines no method"),
    (TOY, "{file}:NoSuchClass", "has no method class 'NoSuchClass'"),
    (TOY.replace('name = "toy_shift"', 'name = "coop"'), "{file}", "method name 'coop' is registered twice"),
    (TOY + "\n\nclass Other(ToyShift):\n    name = 'toy_other'\n", "{file}", "defines 2 methods"),
    (None, "no_such_module_xyz:Thing", "no module named 'no_such_module_xyz'"),
])
def test_broken_plugins_are_clear_errors(source, spec, message, tmp_path, capsys, isolated_registry):
    path = tmp_path / "plugin.py"
    if source is not None:
        path.write_text(source)
    spec = spec.format(file=path) if "{file}" in spec else str(tmp_path / spec) if spec.endswith("Shift") else spec
    assert main(["train", "--method", spec, *SAMPLE, *FAST, "--out", str(tmp_path / "out")]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()  # refused before any work


def test_broken_entry_point_names_its_package(toy_package, capsys):
    (toy_package / "toyplug" / "__init__.py").write_text("raise RuntimeError('toy is broken')\n")
    assert main(["train", "--method", "toy_shift", *SAMPLE, *FAST, "--out", "unused"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "method 'toy_shift' from package toyplug 0.1 failed to import: RuntimeError: toy is broken" in err


def test_entry_point_calling_sys_exit_names_its_package(toy_package, capsys):
    (toy_package / "toyplug" / "__init__.py").write_text("import sys\nsys.exit(3)\n")
    assert main(["train", "--method", "toy_shift", *SAMPLE, *FAST, "--out", "unused"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "method 'toy_shift' from package toyplug 0.1 ended the process" in err and "SystemExit: 3" in err


def test_a_folder_named_as_a_module_is_said_to_be_a_folder(tmp_path, monkeypatch, capsys, isolated_registry):
    (tmp_path / "my_methods").mkdir()
    monkeypatch.chdir(tmp_path)  # the folder is here, but the current directory is not on the Python path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert main(["list", "methods", "--plugin", "my_methods"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "plugin 'my_methods': my_methods is a folder, not a module on the Python path" in err
    assert "no module named" not in err


def test_cluster_jobs_refuse_a_method_defined_in_main(isolated_registry, toy_file):
    from promptclip.cluster import job_plugins
    from promptclip.errors import ConfigError
    from promptclip.protocols import make_cells

    load_plugin(str(toy_file))
    cells = make_cells("fewshot", ["eurosat-sample"], ["toy_shift"], [1], [1])
    assert job_plugins(cells) == (f"{toy_file.resolve()}:ToyShift",)
    base._REGISTRY["toy_shift"].__module__ = "__main__"
    plugins._SOURCES.pop("toy_shift")
    with pytest.raises(ConfigError, match="defined in __main__"):
        job_plugins(cells)


def test_torchrun_ranks_load_the_plugin_from_the_command_line(toy_file, tmp_path, monkeypatch):
    import subprocess

    from promptclip.tracking import METRICS_FILE, read_metrics

    launcher = Path(sys.executable).parent / "torchrun"
    head = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "ddp"
    done = subprocess.run([*head, "--standalone", "--nproc-per-node", "2", "-m", "promptclip", "train", "--method",
                           f"{toy_file}:ToyShift", *SAMPLE, "--shots", "1", *FAST, "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["method_source"] == {"kind": "plugin", "spec": f"{toy_file.resolve()}:ToyShift"}
    steps, epochs = read_metrics(out / METRICS_FILE)  # rank 0 alone writes: every step once, global batches
    assert [s["step"] for s in steps] == [1] and steps[0]["batch_size"] == 10 and len(epochs) == 1
