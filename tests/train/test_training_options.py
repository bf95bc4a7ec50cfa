"""Every training option does what its config docstring says (small models, one process, exact values)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from pipeline.batch import Batch
from train.checkpoint import CheckpointError, check_compatible
from train.config import ModelConfig, OptimConfig
from train.loop import EpochSpec, train_one_epoch
from train.model import build_model
from train.optim import build_loss, build_optimizer, build_scheduler, class_weights
from train.trainer import use_deterministic_kernels


def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    "name,cls,extra",
    [
        ("adam", torch.optim.Adam, {}),
        ("adamw", torch.optim.AdamW, {}),
        ("sgd", torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
    ],
)
def test_optimizers(name, cls, extra):
    opt = build_optimizer(_params(), OptimConfig(name=name, lr=0.05, weight_decay=0.01, momentum=0.8))
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.01
    assert all(group[k] == v for k, v in extra.items())


def _lrs(scheduler, opt, values):
    out = []
    for v in values:
        out.append(opt.param_groups[0]["lr"])
        scheduler.step(v) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else scheduler.step()
    return out


def test_step_schedule_drops_by_gamma_every_step_size_epochs():
    opt = build_optimizer(_params(), OptimConfig(lr=1.0))
    sched = build_scheduler(opt, OptimConfig(scheduler="step", step_size=2, gamma=0.5), epochs=6, monitor_mode="min")
    assert _lrs(sched, opt, [0] * 6) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


def test_plateau_schedule_drops_after_three_epochs_without_improvement():
    opt = build_optimizer(_params(), OptimConfig(lr=1.0))
    sched = build_scheduler(opt, OptimConfig(scheduler="plateau", gamma=0.1), epochs=10, monitor_mode="min")
    # best at epoch 0; patience 2: the 3rd bad epoch cuts the LR
    assert _lrs(sched, opt, [1.0, 2.0, 2.0, 2.0, 2.0]) == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = build_optimizer(_params(), OptimConfig(lr=1.0))
    sched = build_scheduler(opt, OptimConfig(scheduler="cosine", warmup_epochs=1), epochs=5, monitor_mode="min")
    lrs = _lrs(sched, opt, [0] * 5)
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and lrs[3] == pytest.approx(0.5)
    assert lrs[1] > lrs[2] > lrs[3] > lrs[4] > 0


def test_class_weights_are_inverse_frequency_with_mean_one():
    w = class_weights([10, 30, 0, 60])
    assert w[2] == 0  # a class with no sample
    assert w[0] / w[1] == pytest.approx(3.0) and w[0] / w[3] == pytest.approx(6.0)
    assert w[[0, 1, 3]].mean() == pytest.approx(1.0)


def test_loss_uses_class_weights_and_label_smoothing():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.0, 2.0]])
    labels = torch.tensor([0, 3, 1])
    loss = build_loss(OptimConfig(class_weights=True, label_smoothing=0.1), [10, 30, 0, 60], "cpu")
    expected = F.cross_entropy(logits, labels, weight=class_weights([10, 30, 0, 60]), label_smoothing=0.1)
    assert loss(logits, labels).item() == pytest.approx(expected.item())
    plain = build_loss(OptimConfig(), [10, 30, 0, 60], "cpu")(logits, labels)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, labels).item())


class _Batches:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_grad_accum_two_equals_one_step_on_both_batches():
    """grad_accum=2 over two batches of 4 = one SGD step on the mean loss of all 8 samples."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (8,), generator=gen)
    batches = [Batch(images=images[i : i + 4], labels=labels[i : i + 4], keys=list("abcd")) for i in (0, 4)]

    def net():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))

    def augment(x, m, generator=None):
        return x.float() / 255, m

    accelerator = Accelerator(cpu=True)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_one_epoch(
        model,
        opt,
        _Batches(batches),
        augment,
        F.cross_entropy,
        accelerator,
        EpochSpec(epoch=0, steps=2, seed=0, grad_accum=2),
        progress=False,
    )
    ref = net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    F.cross_entropy(ref(images.float() / 255), labels).backward()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    # and grad_accum=1 over the same batches is two steps: different weights
    other = net()
    train_one_epoch(
        other,
        torch.optim.SGD(other.parameters(), lr=0.5),
        _Batches(batches),
        augment,
        F.cross_entropy,
        accelerator,
        EpochSpec(epoch=0, steps=2, seed=0),
        progress=False,
    )
    assert not torch.allclose(other[1].weight, model[1].weight)


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "efficientnet_b0"])
def test_other_timm_models_take_one_channel(name):
    model = build_model(ModelConfig(name=name), num_classes=3).eval()
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 3)


def test_checkpoint_of_another_model_is_refused():
    mine = {"model": "resnet18", "classes": ["a", "b"], "image_size": 128, "in_chans": 1, "batch_size": 8, "seed": 1}
    check_compatible(dict(mine), mine, "ckpt.pth")
    for key, other in [("model", "resnet34"), ("classes", ["a", "c"]), ("image_size", 299), ("batch_size", 16)]:
        with pytest.raises(CheckpointError, match=f"{key}: checkpoint has"):
            check_compatible({**mine, key: other}, mine, "ckpt.pth")


def test_deterministic_switches_torch_to_deterministic_kernels(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    try:
        use_deterministic_kernels(False)
        assert not torch.are_deterministic_algorithms_enabled()
        use_deterministic_kernels(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]


def test_an_empty_val_split_is_refused_before_training(tmp_path):
    from train.config import Config, DataConfig
    from train.trainer import RunError, open_data

    from helpers.indexed_shards import write_shards

    write_shards(tmp_path / "empty", {"train": [6], "val": [], "test": [2]}, masks=False)
    with pytest.raises(RunError, match="the val split is empty"):
        open_data(Config(data=DataConfig(shards=str(tmp_path / "empty"))))
    write_shards(tmp_path / "ok", {"train": [6], "val": [1], "test": []}, masks=False)
    assert open_data(Config(data=DataConfig(shards=str(tmp_path / "ok")))).samples("val") == 1
