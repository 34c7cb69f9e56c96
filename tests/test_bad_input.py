"""The bad-input catalogue: user mistakes over every command and option, through ``main(argv)``.

Each case must end as a user error: exit code 2, one paragraph (``error: ...``) that names the culprit (the option,
value, file, key or class), no traceback, no "unexpected error", and nothing written or half-written in the output
directory (``<out>``: absent afterwards, or unchanged where the case starts from an existing one). Most cases fail
before any weights load; the others load the random ``tiny`` backbone and fail before any training step.

Placeholders in the argv: ``<out>`` (an output directory that does not exist yet), ``<img>`` (a bundled image),
``<file>`` (an existing plain file) and the names of the files :func:`inputs` makes.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from promptclip.cli import main
from promptclip.clip.weights import load_model
from promptclip.data import load_splits
from promptclip.device import check_device
from promptclip.errors import ConfigError
from promptclip.presets import apply_overrides, load_preset

LONG_NAME = " ".join(["word"] * 100)
TINY = ["--backbone", "tiny", "--quiet"]
TRAIN = ["train", "--method", "coop", "--dataset", "eurosat-sample", "--shots", "1", "--out", "<out>", *TINY]
RUN = ["run", "base2novel", "--methods", "zeroshot", "--datasets", "eurosat-sample", "--seeds", "1", "--out", "<out>",
       "--no-plots", *TINY]
EVAL = ["eval", "--method", "zeroshot", *TINY]
PREDICT = ["predict", "<img>", *TINY]
SMALL_RUN = [*RUN[:5], "folder:<two_class>", *RUN[6:]]  # a grid that runs in a second


@dataclass
class Case:
    argv: list[str]
    #: Every fragment must appear in the error paragraph (whitespace-normalised): the culprit and what is wrong.
    says: list[str]
    #: ``(monkeypatch) -> None`` run before the command (e.g. a machine without CUDA).
    patch: object = None
    #: Files to make in ``<out>`` before the command (a run to resume, a state to read); they must be unchanged.
    out_files: dict[str, str] = field(default_factory=dict)
    #: The name of a folder of :func:`inputs` copied to ``<out>`` before the command; it must be unchanged.
    out_from: str | None = None


def no_cuda_build(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)


def cuda_without_gpu(monkeypatch):
    def init():
        raise RuntimeError("Found no NVIDIA driver on your system.")

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", init)


def no_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError


def hub_without_the_repository(monkeypatch):
    import httpx
    from huggingface_hub.utils import RepositoryNotFoundError

    def download(repo_id, filename, **kwargs):
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/{repo_id}"))
        raise RepositoryNotFoundError(f"404 Client Error: Repository Not Found for {repo_id}", response=response)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)


CASES: dict[str, Case] = {
    # -- the cases of the issue ------------------------------------------------------------------------------------
    "predict duplicate class names": Case(
        [*PREDICT, "--classnames", "cat,cat"], ["--classnames 'cat,cat'", "'cat' = 'cat'", "cannot tell apart"]),
    "predict names equal after _ and case": Case(
        [*PREDICT, "--classnames", "sea_lake,Sea  Lake,dog"], ["'sea_lake' = 'Sea  Lake'"]),
    "folder classes sea_lake and sea lake": Case(
        [*TRAIN[:4], "folder:<dup_folder>", *TRAIN[5:]], ["dataset dup_folder", "'sea lake' = 'sea_lake'"]),
    "CSV labels cat and Cat": Case(
        [*EVAL, "--dataset", "csv:<dup_csv>"], ["dataset dup", "'Cat' = 'cat'"]),
    "cross-dataset target with duplicate classes": Case(
        ["run", "cross_dataset", *RUN[2:], "--targets", "csv:<dup_csv>"], ["dataset dup", "'Cat' = 'cat'"]),
    "adapter on duplicate class names": Case(
        [*PREDICT, "--adapter", "<adapter>", "--classnames", "forest,Forest"], ["'forest' = 'Forest'"]),
    "adapter file with duplicate class names": Case(
        [*EVAL[:1], "--adapter", "<dup_adapter>", "--dataset", "folder:<two_class>", "--quiet"],
        ["adapter", "'River' = 'river'"]),
    "predict 100-word class name": Case(
        [*PREDICT, "--classnames", f"{LONG_NAME},dog"],
        ["class name 'word word", "100 tokens long", "context of 77", "at most 70"]),
    "predict 100-word class name after a template": Case(
        [*PREDICT, "--classnames", f"{LONG_NAME},dog", "--template", "a blurry photo of a {}."],
        ["100 tokens long", "'a blurry photo of a word", "at most 69"]),
    "run on a CSV with a 100-word class name": Case(
        [*RUN[:5], "csv:<long_csv>", *RUN[6:]], ["dataset long", "class name 'word word", "100 tokens long"]),
    "--set train.max_epoch=-1": Case(
        [*TRAIN, "--set", "train.max_epoch=-1"], ["train.max_epoch=-1", "train.max_epoch must be at least 1, got -1"]),
    "--set train.lr=0": Case(
        [*TRAIN, "--set", "train.lr=0"], ["train.lr=0", "train.lr must be greater than 0"]),
    "--device cuda on a CPU-only torch": Case(
        [*PREDICT, "--classnames", "a,b", "--device", "cuda"],
        ["--device cuda", "CPU-only build", "Torch not compiled with CUDA enabled", "pip install torch --index-url"],
        patch=no_cuda_build),
    "--device cuda without a GPU": Case(
        [*TRAIN, "--device", "cuda"], ["--device cuda", "finds no usable GPU", "Found no NVIDIA driver"],
        patch=cuda_without_gpu),
    "train --out is a file": Case(
        [*TRAIN[:-4], "<file>", *TINY], ["argument --out", "<file> is an existing file, not a directory"]),
    "run --out is a file": Case([*RUN[:-5], "<file>", "--no-plots", *TINY], ["--out", "<file> is an existing"]),
    "demo --out is a file": Case(["demo", "--out", "<file>", *TINY], ["argument --out", "<file> is an existing"]),
    "report --out is a file": Case(["report", "<records>", "--out", "<file>"], ["argument --out", "<file>"]),
    # -- paths -----------------------------------------------------------------------------------------------------
    "--out inside a file": Case([*TRAIN[:-4], "<file>/run", *TINY], ["<file> is a file, not a directory"]),
    "--out not writable": Case([*TRAIN[:-4], "/sys/promptclip-bad-input", *TINY], ["/sys is not writable"]),
    "captions build --out is a directory": Case(
        ["captions", "build", "--dataset", "eurosat-sample", "--model", "./none", "--out", "<inputs>"],
        ["argument --out", "is a directory"]),
    "captions build --instruction-file missing": Case(
        ["captions", "build", "--dataset", "eurosat-sample", "--model", "./none", "--out", "<out>/c.jsonl",
         "--instruction-file", "<inputs>/missing.txt"], ["<inputs>/missing.txt", "No such file"]),
    "predict missing image": Case([*PREDICT[:1], "<inputs>/none.jpg", "--classnames", "a,b"], ["none.jpg"]),
    "predict empty folder": Case([*PREDICT[:1], "<empty>", "--classnames", "a,b"], ["<empty> holds no image"]),
    "--classnames file missing": Case([*PREDICT, "--classnames", "classes.txt"], ["'classes.txt' looks like a file"]),
    "--adapter missing": Case([*PREDICT, "--adapter", "<inputs>/none"], ["<inputs>/none", "does not exist"]),
    "--adapter metadata not JSON": Case([*PREDICT, "--adapter", "<bad_json_adapter>"], ["is not valid JSON"]),
    "--adapter of an unknown method said to be built in": Case(
        [*PREDICT, "--adapter", "<unknown_method_adapter>"],
        ["unknown method 'coopx'", "promptclip.methods.coop of this promptclip defines no method 'coopx'"]),
    "--adapter tensors truncated": Case([*PREDICT, "--adapter", "<truncated_adapter>"], ["cannot be read"]),
    "--backbone unknown name": Case([*PREDICT[:2], "--classnames", "a,b", "--backbone", "ViT-B/17"], ["'ViT-B/17'"]),
    "--backbone not weights": Case([*PREDICT[:2], "--classnames", "a,b", "--backbone", "<file>"],
                                   ["<file>", "not a format promptclip can read"]),
    "--backbone hf-hub: without a repository": Case([*PREDICT[:2], "--classnames", "a,b", "--backbone", "hf-hub:"],
                                                    ["'hf-hub:' names no repository", "hf-hub:<org>/<repo>"]),
    "--backbone hf-hub: without huggingface_hub": Case(
        [*PREDICT[:2], "--classnames", "a,b", "--backbone", "hf-hub:someorg/some-clip"],
        ["hf-hub:someorg/some-clip (someorg/some-clip on the Hugging Face Hub)",
         "huggingface_hub, which is not installed", "https://huggingface.co/someorg/some-clip"],
        patch=no_huggingface_hub),
    "--backbone hf-hub: repository not found": Case(
        [*PREDICT[:2], "--classnames", "a,b", "--backbone", "hf-hub:someorg/some-clip"],
        ["hf-hub:someorg/some-clip: the Hub has no repository someorg/some-clip"], patch=hub_without_the_repository),
    "--backbone-arch on a test backbone": Case([*PREDICT, "--classnames", "a,b", "--backbone-arch", "ViT-B-16"],
                                               ["tiny is a test backbone", "--backbone-arch"]),
    "--backbone-arch unknown": Case([*PREDICT[:2], "--classnames", "a,b", "--backbone", "<weights>",
                                     "--backbone-arch", "ViT-B-61"],
                                    ["architecture 'ViT-B-61'", "neither a known architecture name nor an existing"]),
    "--feature-cache is a file": Case([*EVAL, "--dataset", "eurosat-sample", "--feature-cache", "<file>"],
                                      ["argument --feature-cache", "<file> is an existing file, not a directory"]),
    "--dataset folder missing": Case([*EVAL, "--dataset", "folder:<inputs>/none"], ["<inputs>/none", "not found"]),
    "--dataset unknown": Case([*EVAL, "--dataset", "eurosatt"], ["unknown dataset 'eurosatt'"]),
    "benchmark without --root": Case([*EVAL, "--dataset", "dtd"], ["'dtd' needs a data root"]),
    "--root missing": Case([*EVAL, "--dataset", "dtd", "--root", "<inputs>/none"], ["<inputs>/none does not exist"]),
    "--preset file missing": Case([*TRAIN, "--preset", "<inputs>/none.yaml"], ["preset file <inputs>/none.yaml"]),
    "--preset not YAML file": Case([*TRAIN, "--preset", "<file>"], ["<file> is not a .yaml file"]),
    "--captions missing": Case([*TRAIN[:2], "mugcp", *TRAIN[3:], "--captions", "<inputs>/none.jsonl"],
                               ["<inputs>/none.jsonl does not exist"]),
    "report on nothing": Case(["report", "<inputs>/none"], ["no records at <inputs>/none"]),
    "data prepare --root is a file": Case(["data", "prepare", "eurosat", "--root", "<file>", "--no-download"],
                                          ["<file> is a file, not a directory"]),
    # -- numbers ---------------------------------------------------------------------------------------------------
    "--shots -1": Case([*TRAIN, "--shots", "-1"], ["argument --shots", "at least 0", "got -1"]),
    "--shots abc": Case([*TRAIN, "--shots", "abc"], ["argument --shots", "'abc' is not an integer"]),
    "--seed -1": Case([*TRAIN, "--seed", "-1"], ["argument --seed", "got -1"]),
    "--seeds 2**32": Case([*RUN, "--seeds", str(2**32)], ["argument --seeds", "below 2**32"]),
    "--top-k 0": Case([*PREDICT, "--classnames", "a,b", "--top-k", "0"], ["argument --top-k", "got 0"]),
    "predict --batch-size 0": Case([*PREDICT, "--classnames", "a,b", "--batch-size", "0"], ["--batch-size"]),
    "eval --batch-size -3": Case([*EVAL, "--dataset", "eurosat-sample", "--batch-size", "-3"], ["got -3"]),
    "--time 0": Case([*RUN, "--executor", "submitit-local", "--time", "0"], ["argument --time", "got 0"]),
    "--gpus-per-job -1": Case([*RUN, "--executor", "submitit-local", "--gpus-per-job", "-1"], ["--gpus-per-job"]),
    "--array-parallelism 0": Case([*RUN, "--executor", "slurm", "--array-parallelism", "0"], ["--array-parallelism"]),
    "captions --max-new-tokens 0": Case(
        ["captions", "build", "--dataset", "eurosat-sample", "--model", "m", "--out", "<out>/c.jsonl",
         "--max-new-tokens", "0"], ["argument --max-new-tokens", "got 0"]),
    "--set train.batch_size=0": Case([*TRAIN, "--set", "train.batch_size=0"], ["train.batch_size must be at least 1"]),
    "--set train.momentum=1.5": Case([*TRAIN, "--set", "train.momentum=1.5"], ["train.momentum must be in [0, 1)"]),
    "--set train.weight_decay=-1": Case([*TRAIN, "--set", "train.weight_decay=-1"], ["train.weight_decay must be"]),
    "--set train.warmup_lr=-1": Case([*TRAIN, "--set", "train.warmup_lr=-1"], ["train.warmup_lr must be greater"]),
    "--set train.warmup_epoch=-1": Case([*TRAIN, "--set", "train.warmup_epoch=-1"], ["train.warmup_epoch must be"]),
    "--set train.grad_clip=0": Case([*TRAIN, "--set", "train.grad_clip=0"], ["train.grad_clip must be null"]),
    "--set train.num_workers=-1": Case([*TRAIN, "--set", "train.num_workers=-1"], ["train.num_workers must be"]),
    "--set train.text_chunk_tokens=0": Case([*TRAIN, "--set", "train.text_chunk_tokens=0"],
                                            ["train.text_chunk_tokens must be at least 1"]),
    "--set eval.batch_size=0": Case([*RUN, "--set", "eval.batch_size=0"], ["eval.batch_size must be at least 1"]),
    "--set train.max_epoch=abc": Case([*TRAIN, "--set", "train.max_epoch=abc"], ["train.max_epoch", "'abc'"]),
    "--set method_config.n_ctx=0": Case([*TRAIN, "--set", "method_config.n_ctx=0"], ["n_ctx must be at least 1"]),
    "--set train.lr=nan": Case([*TRAIN, "--set", "train.lr=nan"], ["train.lr", "expected a finite number, got 'nan'"]),
    "--set train.lr=1e-3x": Case([*TRAIN, "--set", "train.lr=1e-3x"], ["train.lr", "expected a number, got '1e-3x'"]),
    "--set train.max_epoch=1e1": Case([*TRAIN, "--set", "train.max_epoch=1e1"],
                                      ["train.max_epoch", "expected an integer, got '1e1'"]),
    "preset lr: .inf": Case([*TRAIN, "--preset", "<inf_yaml>"], ["inf.yaml", "train.lr", "expected a finite number"]),
    # -- names -----------------------------------------------------------------------------------------------------
    "--method misspelt": Case([*TRAIN[:2], "mapel", *TRAIN[3:]], ["unknown method 'mapel'", "did you mean 'maple'"]),
    "protocol misspelt": Case(["run", "fewshto", *RUN[2:]], ["unknown protocol 'fewshto'"]),
    "--methods twice": Case([*RUN[:3], "zeroshot", "zeroshot", *RUN[4:]], ["methods zeroshot zeroshot"]),
    "--datasets twice": Case([*RUN[:5], "eurosat-sample", "eurosat-sample", *RUN[6:]], ["datasets eurosat-sample"]),
    "--seeds twice": Case([*RUN[:7], "1", "1", *RUN[8:]], ["seeds 1 1", "given more than once"]),
    "--shots twice": Case([*RUN, "--shots", "4", "4"], ["shots 4 4"]),
    "--targets twice": Case(["run", "cross_dataset", *RUN[2:], "--targets", "dtd", "dtd"], ["targets dtd dtd"]),
    "--precision unknown": Case([*TRAIN, "--precision", "fp64"], ["argument --precision", "'fp64'"]),
    "--device gpu": Case([*TRAIN, "--device", "gpu"], ["--device 'gpu' is not a device"]),
    "list unknown": Case(["list", "models"], ["argument what", "'models'"]),
    "eval --method coop without adapter": Case([*EVAL[:2], "coop", *EVAL[3:], "--dataset", "eurosat-sample"],
                                               ["untrained coop", "--adapter"]),
    "train --method zeroshot": Case([*TRAIN[:2], "zeroshot", *TRAIN[3:]], ["'zeroshot' learns nothing"]),
    "--template without {}": Case([*PREDICT, "--classnames", "a,b", "--template", "a photo"],
                                  ["--template 'a photo' has no '{}'"]),
    "--template with a named field": Case([*PREDICT, "--classnames", "a,b", "--template", "a {name}"],
                                          ["'a {name}'", "{name}"]),
    "--template with two fields": Case([*PREDICT, "--classnames", "a,b", "--template", "{} and {}"], ["'{} and {}'"]),
    "--classnames gives nothing": Case([*PREDICT, "--classnames", ",, ,"], ["--classnames ',, ,' gives no class"]),
    "--classnames gives one": Case([*PREDICT, "--classnames", "cat"], ["one class name ('cat')"]),
    # -- bad CSVs, folders and empty datasets ----------------------------------------------------------------------
    "CSV not UTF-8": Case([*EVAL, "--dataset", "csv:<binary_csv>"], ["binary.csv is not UTF-8"]),
    "CSV without header": Case([*EVAL, "--dataset", "csv:<noheader_csv>"], ["noheader.csv", "'path' and 'label'"]),
    "CSV header only": Case([*EVAL, "--dataset", "csv:<headonly_csv>"], ["headonly.csv has a header but no rows"]),
    "CSV short row": Case([*EVAL, "--dataset", "csv:<short_csv>"], ["short.csv line 3", "expected 2 columns"]),
    "CSV missing image": Case([*EVAL, "--dataset", "csv:<noimage_csv>"], ["noimage.csv line 2", "image not found"]),
    "CSV bad split value": Case([*EVAL, "--dataset", "csv:<badsplit_csv>"], ["split 'testing'"]),
    "CSV label out of range": Case([*EVAL, "--dataset", "csv:<range_csv>"], ["range.csv line 3", "label 5"]),
    "CSV row with an empty label": Case([*EVAL, "--dataset", "csv:<nolabel_csv>"],
                                        ["nolabel.csv line 3", "'1.jpg' has an empty label"]),
    "CSV row with an empty classname": Case([*EVAL, "--dataset", "csv:<noname_csv>"],
                                            ["noname.csv line 3", "label 1 has an empty 'classname'"]),
    "CSV one image per class": Case([*EVAL, "--dataset", "csv:<tiny_csv>"], ["class 'cat' has only 1 image"]),
    "CSV without test rows": Case([*EVAL, "--dataset", "csv:<notest_csv>"], ["dataset notest has no test images"]),
    "run on a dataset without test rows": Case([*RUN[:5], "csv:<notest_csv>", *RUN[6:]], ["notest has no test"]),
    "CSV class-name file with duplicates": Case([*EVAL, "--dataset", "csv:<ints_csv>"],
                                                ["ints.classnames.txt lists ['a'] more than once"]),
    "folder without class folders": Case([*EVAL, "--dataset", "folder:<empty>"], ["no class folders found"]),
    "folder with an empty class": Case([*EVAL, "--dataset", "folder:<hole_folder>"], ["empty", "contains no images"]),
    "folder with a class folder not in UTF-8": Case(
        [*EVAL, "--dataset", "folder:<latin1_classes>"],
        ["<latin1_classes> holds a folder whose name is not UTF-8: b'caf\\xe9'", "convmv -f latin1 -t utf-8"]),
    "folder with image file names not in UTF-8": Case(
        [*TRAIN[:4], "folder:<latin1_files>", *TRAIN[5:]],
        ["<latin1_files>/forest holds an image file whose name is not UTF-8: b'img\\xff0.jpg'"]),
    "run on a folder path not in UTF-8": Case([*RUN[:5], "folder:<inputs>/data_caf\udce9", *RUN[6:]],
                                              ["dataset folder:<inputs>/data_caf\\xe9 is not a UTF-8 name"]),
    "--out not in UTF-8": Case([*TRAIN[:-4], "<out>/caf\udce9", *TINY],
                               ["the output directory <out>/caf\\xe9 is not a UTF-8 name"]),
    "train on a folder with a decompression bomb": Case(
        [*TRAIN[:4], "folder:<bomb_folder>", *TRAIN[5:]],
        ["cannot decode image <bomb_folder>/forest/", "DecompressionBomb"]),
    "run on a folder with a decompression bomb": Case(
        [*RUN[:5], "folder:<bomb_folder>", *RUN[6:]], ["cannot decode image <bomb_folder>/forest/"]),
    "base2novel on one class": Case([*RUN[:5], "folder:<one_class>", *RUN[6:]], ["has 1 class", "at least 2"]),
    # -- presets and --set -----------------------------------------------------------------------------------------
    "preset not YAML": Case([*TRAIN, "--preset", "<bad_yaml>"], ["bad.yaml is not valid YAML"]),
    "preset is a list": Case([*TRAIN, "--preset", "<list_yaml>"], ["list.yaml must be a YAML mapping"]),
    "preset train is a number": Case([*TRAIN, "--preset", "<train5_yaml>"], ["train5.yaml", "expected a mapping"]),
    "preset unknown key": Case([*TRAIN, "--preset", "<typo_yaml>"], ["unknown key 'trian'", "did you mean 'train'"]),
    "preset of another method": Case([*TRAIN, "--preset", "maple/vit_b16_c2_ep5_batch4_2ctx"], ["for method 'maple'"]),
    "run --preset without =": Case([*RUN, "--preset", "zeroshot"], ["--preset 'zeroshot'", "METHOD=PRESET"]),
    "--set without =": Case([*TRAIN, "--set", "train"], ["override 'train' is not of the form key=value"]),
    "--set unknown section": Case([*TRAIN, "--set", "trian.lr=1"], ["unknown section 'trian'", "'train'"]),
    "--set unknown key": Case([*TRAIN, "--set", "train.max_epochs=1"], ["did you mean 'max_epoch'"]),
    "--set three levels": Case([*TRAIN, "--set", "train.a.b=1"], ["at most two levels"]),
    "--set a whole section": Case([*TRAIN, "--set", "train=1"], ["train is a section"]),
    # -- interrupted and finished runs -----------------------------------------------------------------------------
    "resume with another configuration": Case(
        [*TRAIN, "--set", "train.max_epoch=1"],
        ["<out> holds a run of another method or configuration"],
        out_files={"train_state.json": json.dumps({"method": "maple", "method_config": {}, "train": {}, "epoch": 0,
                                                   "finished": False, "tensors": "t.safetensors", "history": []})}),
    "training state not JSON": Case([*TRAIN], ["training state <out>/train_state.json is unreadable"],
                                    out_files={"train_state.json": '{"method": "coop", "epo'}),
    "finished cell marker not JSON": Case(SMALL_RUN, ["records.json", "is not valid JSON", "delete it"],
                                          out_files={"<cell>/records.json": "[{"}),
    # -- train --batch-order / --init-adapter, run --adapter, import ------------------------------------------------
    "--batch-order missing": Case([*TRAIN, "--batch-order", "<inputs>/none.json"], ["<inputs>/none.json"]),
    "--batch-order not JSON": Case([*TRAIN, "--batch-order", "<file>"], ["batch order file <file>"]),
    "--batch-order index out of range": Case([*TRAIN, "--batch-order", "<range_order>"],
                                             ["index 99999", "the dataset has 10 samples"]),
    "--batch-order with more epochs than max_epoch": Case(
        [*TRAIN, "--batch-order", "<two_epoch_order>", "--set", "train.max_epoch=1"],
        ["batch order file <two_epoch_order> has 2 epoch(s), the run has max_epoch=1"]),
    "--init-adapter missing": Case([*TRAIN, "--init-adapter", "<inputs>/none"], ["<inputs>/none.safetensors"]),
    "run --adapter without =": Case([*RUN, "--adapter", "coop"], ["--adapter 'coop'", "METHOD=PATH"]),
    "run --adapter for another method": Case([*RUN, "--adapter", "maple=<adapter>"], ["--adapter for maple"]),
    "import missing source": Case(["import", "<inputs>/none", "--method", "coop", "--out", "<out>", "--dataset",
                                   "eurosat-sample"], ["<inputs>/none does not exist"]),
    "import not a checkpoint": Case(["import", "<file>", "--method", "coop", "--out", "<out>", "--dataset",
                                     "eurosat-sample"], ["<file>", "not a complete torch.save archive"]),
    "import --epoch abc": Case(["import", "<file>", "--method", "coop", "--out", "<out>", "--dataset", "eurosat-sample",
                                "--epoch", "abc"], ["--epoch 'abc'"]),
    "import --out is a file": Case(["import", "<file>", "--method", "coop", "--out", "<file>", "--dataset",
                                    "eurosat-sample"], ["argument --out", "<file> is an existing file"]),
    "import --dataset and --classnames": Case(["import", "<file>", "--method", "coop", "--out", "<out>", "--dataset",
                                               "eurosat-sample", "--classnames", "a,b"], ["--dataset or --classnames"]),
    "import duplicate --classnames": Case(["import", "<file>", "--method", "coop", "--out", "<out>", "--classnames",
                                           "cat,Cat"], ["'cat' = 'Cat'"]),
    # -- tensors that are not finite -------------------------------------------------------------------------------
    "eval an adapter holding NaN": Case(
        [*EVAL[:1], "--adapter", "<nan_adapter>", "--dataset", "eurosat-sample", "--quiet"],
        ["adapter tensors <nan_adapter>/adapter.safetensors", "tensor 'ctx' has 3 of", "values that are not finite"]),
    "predict with an adapter holding NaN": Case([*PREDICT, "--adapter", "<nan_adapter>"],
                                                ["<nan_adapter>", "tensor 'ctx' has 3 of"]),
    "run --adapter holding NaN": Case([*RUN[:3], "coop", *RUN[4:], "--adapter", "coop=<nan_adapter>"],
                                      ["<nan_adapter>", "tensor 'ctx' has 3 of"]),
    "train --init-adapter holding NaN": Case([*TRAIN, "--init-adapter", "<nan_adapter>"],
                                             ["<nan_adapter>", "tensor 'ctx' has 3 of"]),
    "resume a training state holding Inf": Case(
        [*TRAIN[:4], "folder:<two_class>", *TRAIN[5:], "--set", "train.max_epoch=1"],
        ["training state <out>/train_state-epoch0.safetensors", "tensor 'momentum.ctx' has 1 of", "not finite"],
        out_from="inf_state_run"),
    "import a checkpoint holding NaN": Case(
        ["import", "<nan_dassl>", "--method", "coop", "--out", "<out>", "--classnames", "a,b", *TINY],
        ["model.pth.tar-1", "tensor 'prompt_learner.ctx' has 2 of 2,048 values that are not finite"]),
    # -- plugins -----------------------------------------------------------------------------------------------------
    "--plugin calls sys.exit() at import": Case(
        [*TRAIN, "--plugin", "<exit_plugin>"],
        ["plugin file <exit_plugin> ended the process", "SystemExit: None", 'if __name__ == "__main__":']),
    "--plugin is a training script": Case(
        ["list", "methods", "--plugin", "<script_plugin>"],
        ["plugin file <script_plugin> ended the process", "SystemExit: 2",
         "the following arguments are required: --lr", 'if __name__ == "__main__":']),
    "--plugin is a folder": Case([*TRAIN, "--plugin", "<empty>"], ["<empty> is a folder, not a Python file"]),
    # -- captions (MuGCP) ------------------------------------------------------------------------------------------
    "mugcp without captions": Case([*TRAIN[:2], "mugcp", *TRAIN[3:]], ["'mugcp' needs one caption per image"]),
    "mugcp with captions for one image": Case([*TRAIN[:2], "mugcp", *TRAIN[3:], "--captions", "<partial_captions>"],
                                              ["have no caption in", "partial.csv"]),
    "captions file not JSONL": Case([*TRAIN[:2], "mugcp", *TRAIN[3:], "--captions", "<file>"], ["<file>:1"]),
    # -- class descriptions (CoPrompt) -----------------------------------------------------------------------------
    "--descriptions missing": Case([*TRAIN[:2], "coprompt", *TRAIN[3:], "--descriptions", "<inputs>/none.json"],
                                   ["class descriptions file not found", "none.json"]),
    "--descriptions not JSON": Case([*TRAIN[:2], "coprompt", *TRAIN[3:], "--descriptions", "<file>"],
                                    ["cannot read class descriptions file", "afile"]),
    "--descriptions for one class": Case(
        [*TRAIN[:2], "coprompt", *TRAIN[3:], "--descriptions", "<partial_descriptions>"],
        ["partial_descriptions.json", "9 of 10 classes of eurosat-sample have no description", "'Annual Crop Land'",
         "--descriptions FILE"]),
    "run --descriptions for one class": Case(
        [*RUN[:3], "coprompt", *RUN[4:], "--descriptions", "<partial_descriptions>"],
        ["partial_descriptions.json", "have no description", "'Forest'"]),
    "bundled descriptions of another dataset": Case(
        ["train", "--method", "coprompt", "--dataset", "folder:<two_class>", "--shots", "1", "--out", "<out>", *TINY,
         "--set", "method_config.descriptions=dtd"],
        ["bundled:dtd", "2 of 2 classes of two_class have no description", "'forest'"]),
}


def write_images(folder: Path, count: int, source: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shutil.copy(source, folder / f"{i}.jpg")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The files the cases read, made once: bad CSVs and presets, odd folders, damaged adapters, a finished grid."""
    root = tmp_path_factory.mktemp("bad_inputs")
    image = Path(load_splits("eurosat-sample").test[0].path)
    (root / "afile").write_text("not what any option expects\n")
    (root / "empty").mkdir()
    for name in ("sea_lake", "sea lake", "forest"):
        write_images(root / "dup_folder" / name, 3, image)
    write_images(root / "one_class" / "forest", 10, image)
    for name in ("forest", "river"):
        write_images(root / "two_class" / name, 4, image)
    write_images(root / "hole_folder" / "full", 3, image)
    # Images whose pixel count is past PIL's decompression-bomb limit (2 x 89,478,485): 28 kB files, no decoder runs.
    write_images(root / "bomb_folder" / "river", 4, image)
    (root / "bomb_folder" / "forest").mkdir()
    Image.new("1", (15000, 15000)).save(root / "bomb_folder" / "forest" / "0.png")
    for i in range(1, 4):
        shutil.copy(root / "bomb_folder" / "forest" / "0.png", root / "bomb_folder" / "forest" / f"{i}.png")
    (root / "hole_folder" / "empty").mkdir()
    csvs = root / "csv"
    write_images(csvs, 4, image)
    rows = {
        "dup": "path,label\n0.jpg,cat\n1.jpg,Cat\n2.jpg,cat\n3.jpg,Cat\n",
        "long": f"path,label,split\n0.jpg,{LONG_NAME},train\n1.jpg,dog,train\n2.jpg,{LONG_NAME},test\n3.jpg,dog,test\n",
        "noheader": "0.jpg,cat\n1.jpg,dog\n",
        "headonly": "path,label\n",
        "short": "path,label\n0.jpg,cat\n1.jpg\n",
        "noimage": "path,label\nnone.jpg,cat\n",
        "badsplit": "path,label,split\n0.jpg,cat,train\n1.jpg,dog,testing\n",
        "range": "path,label,classname\n0.jpg,0,cat\n1.jpg,5,dog\n",
        "tiny": "path,label\n0.jpg,cat\n1.jpg,dog\n",
        "notest": "path,label,split\n0.jpg,cat,train\n1.jpg,dog,train\n2.jpg,cat,val\n",
        "ints": "path,label\n0.jpg,0\n1.jpg,1\n",
        "nolabel": "path,label\n0.jpg,cat\n1.jpg, \n2.jpg,dog\n",
        "noname": "path,label,classname\n0.jpg,0,cat\n1.jpg,1,\n2.jpg,1,dog\n",
    }
    for name, text in rows.items():
        (csvs / f"{name}.csv").write_text(text)
    (csvs / "ints.classnames.txt").write_text("a\na\n")
    (csvs / "binary.csv").write_bytes(b"\xff\xfe\x00p\x00a\x00t\x00h")
    presets = {"bad": "method: coop\ntrain: [1,\n", "list": "- method\n- coop\n", "train5": "method: coop\ntrain: 5\n",
               "typo": "method: coop\ntrian: {}\n", "inf": "method: coop\ntrain:\n  lr: .inf\n"}
    for name, text in presets.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "partial.csv").write_text(f"path,caption\n{image},a satellite photo of trees\n")
    (root / "partial_descriptions.json").write_text('{"River": ["a river seen from above"]}')
    (root / "range_order.json").write_text("[[[0, 99999]]]")
    (root / "two_epoch_order.json").write_text("[[[0, 1]], [[2, 3]]]")
    try:  # names in Latin-1 bytes (Linux file systems take any bytes; others may refuse them)
        write_images(root / "latin1_classes" / "caf\udce9", 3, image)
        write_images(root / "latin1_classes" / "river", 3, image)
        (root / "latin1_files" / "forest").mkdir(parents=True)
        for i in range(3):
            shutil.copy(image, root / "latin1_files" / "forest" / f"img\udcff{i}.jpg")
        write_images(root / "latin1_files" / "river", 3, image)
        (root / "data_caf\udce9").mkdir()
    except (OSError, UnicodeEncodeError):
        pass
    (root / "exits.py").write_text("import sys\n\nsys.exit()\n")
    (root / "train_script.py").write_text("import argparse\n\nparser = argparse.ArgumentParser()\n"
                                          "parser.add_argument('--lr', type=float, required=True)\n"
                                          "args = parser.parse_args()\n")
    paths = {"inputs": root, "file": root / "afile", "empty": root / "empty", "img": image,
             **{f"{n}_folder": root / f"{n}_folder" for n in ("dup", "hole")}, "one_class": root / "one_class",
             "two_class": root / "two_class", "bomb_folder": root / "bomb_folder",
             **{f"{n}_csv": csvs / f"{n}.csv" for n in [*rows, "binary"]},
             **{f"{n}_yaml": root / f"{n}.yaml" for n in presets}, "partial_captions": root / "partial.csv",
             "partial_descriptions": root / "partial_descriptions.json",
             "range_order": root / "range_order.json",
             "two_epoch_order": root / "two_epoch_order.json",
             "exit_plugin": root / "exits.py",
             "script_plugin": root / "train_script.py",
             **{n: root / n for n in ("latin1_classes", "latin1_files") if (root / n).exists()}}
    # A plain state dict of the tiny architecture (as open_clip or a fine-tuning script saves one).
    torch.save(load_model("tiny").state_dict(), root / "weights.pt")
    paths["weights"] = root / "weights.pt"
    # A trained adapter (one epoch on 10 images), and damaged copies of it.
    adapter = root / "adapter"
    assert main(["train", "--method", "coop", "--dataset", f"folder:{root / 'two_class'}", "--shots", "1", "--set",
                 "train.max_epoch=1", "--out", str(adapter), *TINY]) == 0
    for name in ("dup_adapter", "bad_json_adapter", "truncated_adapter", "unknown_method_adapter"):
        shutil.copytree(adapter, root / name)
        paths[name] = root / name
    meta = json.loads((adapter / "adapter.json").read_text())
    (root / "dup_adapter" / "adapter.json").write_text(json.dumps({**meta, "classnames": ["River", "river"]}))
    (root / "bad_json_adapter" / "adapter.json").write_text('{"method": "coop",')
    (root / "unknown_method_adapter" / "adapter.json").write_text(json.dumps({**meta, "method": "coopx"}))
    tensors = root / "truncated_adapter" / "adapter.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:40])
    paths["adapter"] = adapter
    # Not finite: an adapter with three NaN, a training state with one Inf, a reference checkpoint with two NaN.
    shutil.copytree(adapter, root / "nan_adapter")
    tensors = load_file(root / "nan_adapter" / "adapter.safetensors")
    tensors["ctx"][0, :3] = float("nan")
    save_file(tensors, root / "nan_adapter" / "adapter.safetensors")
    shutil.copytree(adapter, root / "inf_state_run")
    state = root / "inf_state_run" / "train_state-epoch0.safetensors"
    tensors = load_file(state)
    tensors["momentum.ctx"][1, 1] = float("-inf")
    save_file(tensors, state)
    nan_dassl = root / "nan_dassl" / "prompt_learner" / "model.pth.tar-1"
    nan_dassl.parent.mkdir(parents=True)
    ctx = torch.zeros(16, 128)
    ctx[2, 5:7] = float("nan")
    torch.save({"state_dict": {"ctx": ctx}, "epoch": 1}, nan_dassl)
    paths.update(nan_adapter=root / "nan_adapter", inf_state_run=root / "inf_state_run", nan_dassl=root / "nan_dassl")
    # A finished zero-shot grid: its records for `report`, its cell directory for a damaged done marker.
    grid = root / "grid"
    argv = [fill(a, {"out": str(grid), "two_class": str(root / "two_class")}) for a in SMALL_RUN]
    assert main(argv) == 0
    record = json.loads((grid / "records.jsonl").read_text().splitlines()[0])
    paths["records"] = grid / "records.jsonl"
    paths["cell"] = Path(record["run_dir"]).relative_to(grid)
    return {name: str(value) for name, value in paths.items()}


def fill(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace(f"<{name}>", value)
    return text


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes, except cell locks (``.claim``: empty, taken to read a cell)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".claim"}


def sys_is_writable() -> bool:
    try:
        Path("/sys/promptclip-probe").mkdir()
    except OSError:
        return False
    Path("/sys/promptclip-probe").rmdir()
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_one_paragraph_user_error_and_writes_nothing(name, inputs, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    if "/sys/" in " ".join(case.argv) and (not Path("/sys").is_dir() or sys_is_writable()):
        pytest.skip("needs a /sys that refuses new folders (Linux)")
    if any("<latin1" in arg or "caf\udce9" in arg for arg in case.argv) and "latin1_files" not in inputs:
        pytest.skip("needs a file system that takes names in any bytes")
    out = tmp_path / "out"
    values = {**inputs, "out": str(out)}
    if case.out_from is not None:
        shutil.copytree(inputs[case.out_from], out)
    for rel, text in case.out_files.items():
        target = out / fill(rel, values)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    before = listing(out)
    if case.patch is not None:
        case.patch(monkeypatch)
    capsys.readouterr()
    code = main([fill(arg, values) for arg in case.argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}; stderr:\n{err}"
    assert "Traceback" not in err and "unexpected error" not in err, err
    starts = [i for i, line in enumerate(err.splitlines()) if line.startswith("error:")]
    assert len(starts) == 1, err
    paragraph = "\n".join(err.splitlines()[starts[0]:]).strip()
    assert "\n\n" not in paragraph, f"more than one paragraph:\n{paragraph}"
    said = " ".join(paragraph.split())
    for fragment in case.says:
        assert " ".join(fill(fragment, values).split()) in said, f"{fragment!r} not in: {said}"
    if case.out_files or case.out_from:
        assert listing(out) == before, "the output directory was written to"
    else:
        assert not out.exists(), f"the output directory was created: {listing(out)}"


def test_device_check_says_what_torch_reports(monkeypatch):
    assert check_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        check_device("gpu")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match=r"--device cuda:3: only 1 GPU\(s\) are visible"):
        check_device("cuda:3")


@pytest.mark.parametrize("text", ["0.002", "2e-3", "2E-3", "2.0e-3", "+2e-3", "0.000_2e1"])
def test_every_spelling_of_a_number_is_accepted_in_overrides_and_preset_files(text, tmp_path):
    preset = load_preset("coop/vit_b16")
    assert apply_overrides(preset, [f"train.lr={text}"]).train.lr == 0.002
    for value in (text, f"'{text}'"):  # as YAML reads it (2e-3 is a string in YAML 1.1), and quoted
        file = tmp_path / "lr.yaml"
        file.write_text(f"method: coop\ntrain:\n  lr: {value}\n")
        assert load_preset(file).train.lr == 0.002


@pytest.mark.parametrize("text,value", [("10", 10), ("+10", 10), ("1_0", 10), (" 10 ", 10)])
def test_every_spelling_of_an_integer_is_accepted(text, value):
    preset = load_preset("coop/vit_b16")
    assert apply_overrides(preset, [f"train.max_epoch={text}"]).train.max_epoch == value
    assert apply_overrides(preset, [f"train.max_epoch='{text}'"]).train.max_epoch == value


def test_a_plugin_running_argparse_prints_no_usage_line_of_its_own(inputs, capsys):
    assert main(["list", "methods", "--plugin", inputs["script_plugin"]]) == 2
    captured = capsys.readouterr()
    assert "usage:" not in captured.err + captured.out and "--lr LR" not in captured.err
