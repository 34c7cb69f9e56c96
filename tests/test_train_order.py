"""Explicit batch orders (``fit(batch_order=...)``), per-step records (``on_step``), the Dassl OPTIM mapping, and
one pass over the loader per epoch."""

import json

import pytest
import torch

from promptclip.clip.architectures import build_random
from promptclip.data.loader import ExplicitBatchSampler, SeededShuffleSampler, TensorDataset, read_batch_order
from promptclip.errors import ConfigError, DataError, PromptClipError
from promptclip.methods import create_method
from promptclip.train import TrainConfig, dassl_lr, fit, train_config_from_dassl


class Logged(TensorDataset):
    """Records every index fetched, in order."""

    def __init__(self, n=12, classes=3, size=224):
        super().__init__(torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)),
                         torch.arange(n) % classes)
        self.fetched: list[int] = []

    def __getitem__(self, index):
        self.fetched.append(index)
        return super().__getitem__(index)


ORDER = [[[3, 2, 4, 6], [5, 1, 9, 10], [8, 0, 7, 11]],
         [[10, 6, 1, 5], [0, 8, 2, 11], [3, 9, 7]],  # a short last batch: kept, not dropped
         [[3, 7], [6, 8, 11, 1, 0, 4, 2, 10, 9, 5]]]


@pytest.fixture(scope="module")
def backbone():
    return build_random("tiny", seed=0)


def coop(backbone):
    return create_method("coop", backbone, ["a", "b", "c"], {"n_ctx": 4, "init_seed": 3})


def config(**changes):
    return TrainConfig(**({"batch_size": 4, "lr": 0.02, "max_epoch": 3, "precision": "fp32", "seed": 5} | changes))


def test_fit_visits_exactly_the_given_batches_in_order(backbone):
    data = Logged()
    steps = []
    result = fit(coop(backbone), data, config(), progress=False, batch_order=ORDER, on_step=steps.append)
    assert data.fetched == [i for epoch in ORDER for batch in epoch for i in batch]
    assert [r["steps"] for r in result.history] == [3, 3, 2]
    assert [(s["epoch"], s["batch"], s["batches"], s["batch_size"]) for s in steps] == [
        (e + 1, k + 1, len(epoch), len(batch)) for e, epoch in enumerate(ORDER) for k, batch in enumerate(epoch)]
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert [s["lr"] for s in steps] == [dassl_lr(s["epoch"] - 1, config()) for s in steps]
    assert all({"loss", "acc"} <= set(s) for s in steps)


def test_seeded_shuffle_reads_each_epochs_permutation_once(backbone):
    data = Logged()
    fit(coop(backbone), data, config(batch_size=4, max_epoch=2), progress=True)  # the progress bar is on
    expected = []
    sampler = SeededShuffleSampler(len(data), 5)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += list(sampler)
    assert data.fetched == expected


def test_a_resumed_run_must_replay_the_same_order(backbone, tmp_path):
    fit(coop(backbone), Logged(), config(), out_dir=tmp_path, progress=False, batch_order=ORDER)
    other = [ORDER[1], ORDER[0], ORDER[2]]
    with pytest.raises(PromptClipError, match="another batch order"):
        fit(coop(backbone), Logged(), config(), out_dir=tmp_path, progress=False, batch_order=other)
    with pytest.raises(PromptClipError, match="another batch order"):
        fit(coop(backbone), Logged(), config(), out_dir=tmp_path, progress=False)
    again = fit(coop(backbone), Logged(), config(), out_dir=tmp_path, progress=False, batch_order=ORDER)
    assert again.resumed_from_epoch == 2


@pytest.mark.parametrize("order, message", [
    (ORDER[:2], "2 epoch"),
    ([ORDER[0], ORDER[1], [[0, 12]]], "epoch 3, batch 1 has index 12"),
    ([ORDER[0], [[0, 1], []], ORDER[2]], "epoch 2, batch 2 must be a non-empty list"),
    ([ORDER[0], ORDER[1], [[0, -1]]], "index -1"),
    ([ORDER[0], ORDER[1], [[0, 1.5]]], "index 1.5"),
    ([], "non-empty list of epochs"),
])
def test_bad_orders_name_the_epoch_batch_or_index(backbone, order, message):
    with pytest.raises(PromptClipError, match=message):
        fit(coop(backbone), Logged(), config(), progress=False, batch_order=order)


def test_data_parallel_ranks_get_their_share_of_each_listed_batch():
    sampler = ExplicitBatchSampler([[[0, 1, 2, 3, 4], [5, 6]]], 7, rank=1, world_size=2)
    sampler.set_epoch(0)
    assert list(sampler) == [[1, 3], [6]]
    with pytest.raises(DataError, match="epoch 2 has no batches"):
        sampler.set_epoch(1)


def test_batch_order_files(tmp_path):
    plain, nested, golden_like = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    plain.write_text(json.dumps(ORDER))
    nested.write_text(json.dumps({"orders": ORDER}))
    golden_like.write_text(json.dumps({"trajectory": {"orders": ORDER, "epochs": 3}}))
    assert read_batch_order(plain) == read_batch_order(nested) == read_batch_order(golden_like) == ORDER
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        read_batch_order(tmp_path / "bad.json")
    (tmp_path / "keys.json").write_text(json.dumps({"order": ORDER}))
    with pytest.raises(DataError, match="needs the key 'orders'; it has order"):
        read_batch_order(tmp_path / "keys.json")
    with pytest.raises(DataError, match="not found"):
        read_batch_order(tmp_path / "missing.json")


def test_dassl_optim_maps_to_the_engine_config():
    optim = {"NAME": "sgd", "LR": 0.0035, "WEIGHT_DECAY": 0.0005, "MOMENTUM": 0.9, "SGD_DAMPNING": 0,
             "SGD_NESTEROV": False, "STAGED_LR": False, "LR_SCHEDULER": "cosine", "MAX_EPOCH": 5, "WARMUP_EPOCH": 1,
             "WARMUP_TYPE": "constant", "WARMUP_CONS_LR": 1e-05, "WARMUP_RECOUNT": True}
    ours = train_config_from_dassl(optim, 4, precision="fp32")
    assert (ours.lr, ours.max_epoch, ours.batch_size, ours.warmup_epoch, ours.warmup_lr, ours.momentum,
            ours.weight_decay, ours.precision) == (0.0035, 5, 4, 1, 1e-05, 0.9, 0.0005, "fp32")
    for key, value in [("NAME", "rmsprop"), ("LR_SCHEDULER", "single_step"), ("WARMUP_TYPE", "linear"),
                       ("STAGED_LR", True), ("SGD_NESTEROV", True), ("WARMUP_RECOUNT", False)]:
        with pytest.raises(ConfigError, match=f"OPTIM.{key}"):
            train_config_from_dassl(optim | {key: value}, 4)
