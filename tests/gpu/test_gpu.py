"""What only a GPU can show: pinned non-blocking copies, autocast around the augmentation, bf16/fp16 steps,
host syncs in the step, checkpoints across devices, torch.compile. Run by `make gpu-check` (`pytest -m gpu`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from pipeline.augment import WARPS, DeviceAugment
from pipeline.batch import Batch
from pipeline.loader import build_loader, load_shard_manifest
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import load_config
from train.loop import EpochSpec, train_one_epoch, train_step
from train.optim import build_loss
from train.presets import build_augment, build_split_loader
from train.trainer import build_state

if not torch.cuda.is_available():
    # one line in the summary; `pytest -m gpu` alone then collects nothing and exits 5 (tools.gpu_check knows)
    pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)", allow_module_level=True)

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@contextmanager
def fresh_accelerator(**kwargs) -> Iterator[Accelerator]:
    """An Accelerator with its own precision/device: accelerate keeps one process-wide state, reset around it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield Accelerator(**kwargs)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def run_state(shards, accelerator: Accelerator, *overrides: str):
    """TrainState, loss and train augmentation as train/trainer.py builds them, for a small ResNet-18 run."""
    cfg = load_config(
        None, [f"data.shards={shards}", "data.image_size=64", "data.num_workers=0", "train.batch_size=8", *overrides]
    )
    manifest = load_shard_manifest(str(shards))
    state = build_state(cfg, accelerator, manifest, build_split_loader(cfg, "train", manifest=manifest))
    loss_fn = build_loss(cfg.optim, manifest.split("train").class_counts, accelerator.device)
    return state, loss_fn, build_augment(cfg, train=True).to(accelerator.device), manifest


def device_batch(manifest, device: torch.device, n: int = 8, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    size = manifest.image_size
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, len(manifest.classes), (n,), generator=gen)
    return Batch(images=images, labels=labels, keys=[f"{seed}-{i}" for i in range(n)]).to(device)


def test_pinned_batches_arrive_intact_with_non_blocking_copies(phantom_shards):
    """Copies queued behind a busy device while the loader moves on: each must land as it was on the host."""
    loader = build_loader(phantom_shards, "train", batch_size=4, num_workers=2, pin_memory=True)
    kept = []
    for batch in loader.iter_epochs(3):
        assert batch.images.is_pinned() and batch.labels.is_pinned()
        ref = (batch.images.clone(), batch.labels.clone(), batch.masks.clone())
        torch.cuda._sleep(2_000_000)  # keep the stream busy, so the copy is still queued when the host moves on
        moved = batch.to(CUDA, non_blocking=True)
        kept.append((ref, moved))
    torch.cuda.synchronize()
    assert len(kept) >= 3 * loader.steps_per_epoch
    for (images, labels, masks), moved in kept:
        assert torch.equal(moved.images.cpu(), images) and torch.equal(moved.labels.cpu(), labels)
        assert torch.equal(moved.masks.cpu(), masks)


@pytest.mark.parametrize("warp", sorted(WARPS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_augment_stays_float32_under_autocast_and_matches_the_cpu(warp, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 1, 299, 299), dtype=torch.uint8, generator=gen)
    m = (torch.rand(16, 1, 299, 299, generator=gen) > 0.5).to(torch.uint8)
    aug = DeviceAugment(train=True, warp=warp, image_size=128)
    with torch.autocast("cuda", dtype=dtype):
        y, ym = aug(x.to(CUDA), m.to(CUDA), generator=torch.Generator(device=CUDA).manual_seed(1))
    assert y.dtype == torch.float32 and ym.dtype == torch.float32
    matrix = aug.last_params["matrix"].cpu()
    # the same matrices on the CPU, through the same warp, resize and normalisation
    xw, mw = WARPS[warp](x.float() / 255, m.float(), matrix)
    xw = torch.nn.functional.interpolate(xw, size=(128, 128), mode="bilinear", align_corners=False, antialias=True)
    mw = torch.nn.functional.interpolate(mw, size=(128, 128), mode="nearest")
    # float32 rounding of the sampling grid differs between the devices: 2e-3 in normalised units is
    # 4.5e-4 of the [0, 1] range (0.12 of a grey level), on noise images (the steepest gradients)
    torch.testing.assert_close(y.cpu(), (xw - aug.mean) / aug.std, atol=2e-3, rtol=0)
    assert (ym.cpu() != mw).float().mean() <= 1e-4  # nearest: equal but for rounding ties


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_give_finite_losses(phantom_shards, precision):
    with fresh_accelerator(mixed_precision=precision) as acc:
        state, loss_fn, augment, manifest = run_state(phantom_shards, acc)
        assert (acc.scaler is not None) == (precision == "fp16")  # fp16 goes through a GradScaler
        gen = torch.Generator(device=CUDA).manual_seed(0)
        losses = [
            train_step(
                state.model, state.optimizer, device_batch(manifest, CUDA, seed=i), augment, loss_fn, acc, generator=gen
            )[0]
            for i in range(4)
        ]
        assert all(torch.isfinite(torch.stack(losses)).tolist())
        assert all(torch.isfinite(p).all() for p in state.model.parameters())


def _sync_warnings(run) -> int:
    """How many synchronizing CUDA calls `run()` made (torch's sync debug mode, warn level)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_the_epoch_loop_syncs_with_the_host_only_at_logging_and_its_end(phantom_shards):
    """bf16 epochs of 3 and 9 steps (logging only at the last): the same count of host syncs, none per step."""
    with fresh_accelerator(mixed_precision="bf16") as acc:
        state, loss_fn, augment, manifest = run_state(phantom_shards, acc)
        host = [device_batch(manifest, torch.device("cpu"), seed=i).pin_memory() for i in range(9)]

        def epoch(steps: int):
            spec = EpochSpec(epoch=0, steps=steps, seed=0, log_every=1000)
            return lambda: train_one_epoch(
                state.model, state.optimizer, host[:steps], augment, loss_fn, acc, spec, progress=False
            )

        epoch(3)()  # warm: cuDNN autotuning and lazy optimizer state sync once
        short, long = _sync_warnings(epoch(3)), _sync_warnings(epoch(9))
        assert long == short, f"{long - short} more host syncs over 6 more steps: something in the step syncs"


def test_a_cuda_checkpoint_resumes_on_cpu_and_back(phantom_shards, tmp_path):
    path = tmp_path / "checkpoint.pth"
    with fresh_accelerator(mixed_precision="bf16") as acc:
        state, loss_fn, augment, manifest = run_state(phantom_shards, acc)
        train_step(state.model, state.optimizer, device_batch(manifest, CUDA), augment, loss_fn, acc)
        save_checkpoint(path, state.state_dict(epoch=0))
        on_cuda = {k: v.cpu() for k, v in state.weights().items()}
    with fresh_accelerator(cpu=True) as acc:
        state, loss_fn, augment, manifest = run_state(phantom_shards, acc)
        state.load_state_dict(load_checkpoint(path), path)
        assert all(torch.equal(v, on_cuda[k]) for k, v in state.weights().items())
        train_step(state.model, state.optimizer, device_batch(manifest, acc.device, seed=1), augment, loss_fn, acc)
        save_checkpoint(path, state.state_dict(epoch=1))
        on_cpu = {k: v.clone() for k, v in state.weights().items()}
    with fresh_accelerator(mixed_precision="bf16") as acc:
        state, loss_fn, augment, manifest = run_state(phantom_shards, acc)
        assert state.load_state_dict(load_checkpoint(path), path).epoch == 2
        assert all(torch.equal(v.cpu(), on_cpu[k]) for k, v in state.weights().items())
        assert all(
            s.device.type == CUDA.type
            for group in state.optimizer.state.values()
            for s in group.values()
            if torch.is_tensor(s) and s.ndim > 0
        )  # Adam's moments follow the parameters back
        loss, _ = train_step(state.model, state.optimizer, device_batch(manifest, CUDA, seed=2), augment, loss_fn, acc)
        assert torch.isfinite(loss).item()


def test_compiled_model_trains_and_saves_clean_state_dict_keys(phantom_shards, tmp_path):
    from timm import create_model

    from train.checkpoint import load_best_model, save_best_model

    with fresh_accelerator(mixed_precision="bf16") as acc:
        state, loss_fn, augment, manifest = run_state(phantom_shards, acc, "model.compile=true")
        assert hasattr(state.model, "_orig_mod")  # really compiled
        gen = torch.Generator(device=CUDA).manual_seed(0)
        for i in range(3):
            loss, _ = train_step(
                state.model, state.optimizer, device_batch(manifest, CUDA, seed=i), augment, loss_fn, acc, generator=gen
            )
        assert torch.isfinite(loss).item()
        weights = state.weights()
        assert not any(k.startswith("_orig_mod.") or k.startswith("module.") for k in weights)
        assert not any("_orig_mod." in k for k in state.state_dict(epoch=0)["model"])
        save_best_model(tmp_path, weights, {"model": "resnet18"})
    loaded, _ = load_best_model(tmp_path / "best_model.pth")
    plain = create_model("resnet18", in_chans=1, num_classes=len(manifest.classes))
    plain.load_state_dict(loaded, strict=True)


def test_evaluation_copies_predictions_to_the_host_once(phantom_shards):
    """predict_split keeps probabilities on the device: 2 and 8 batches make the same number of host syncs."""
    from train.predictions import predict_split

    with fresh_accelerator(mixed_precision="bf16") as acc:
        state, _, _, manifest = run_state(phantom_shards, acc)
        augment = DeviceAugment(train=False, image_size=64).to(CUDA)
        host = [device_batch(manifest, torch.device("cpu"), seed=i).pin_memory() for i in range(8)]
        predict_split(state.model, host[:2], augment, acc)  # warm
        few = _sync_warnings(lambda: predict_split(state.model, host[:2], augment, acc))
        many = _sync_warnings(lambda: predict_split(state.model, host, augment, acc))
        assert many == few, f"{many - few} more host syncs over 6 more batches"


@pytest.mark.parametrize("warp_at", ["stored", "training"])
def test_the_acquisition_chain_and_the_lung_crop_run_on_the_device_without_host_tensors(warp_at):
    """Every drawn parameter, grain and crop matrix lands on the batch's device (a CPU-only run cannot tell),
    with a CUDA generator as the training loop passes, and under autocast."""
    from pipeline.acquisition import AcquisitionRanges

    ranges = AcquisitionRanges(gamma=0.4, contrast=0.3, brightness=0.1, blur=1.0, noise=0.04, resample=0.6,
                               zoom=0.15, shift=0.06)  # fmt: skip
    x = torch.randint(0, 256, (8, 1, 96, 96), dtype=torch.uint8, device=CUDA)
    m = torch.zeros_like(x)
    m[:, :, 20:76, 12:84] = 1
    aug = DeviceAugment(train=True, image_size=64, acquisition=ranges, crop="lungs", warp_at=warp_at).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, mm = aug(x, m, generator=torch.Generator(device=CUDA).manual_seed(0))
    assert y.device.type == "cuda" and mm.device.type == "cuda" and y.dtype == torch.float32
    assert torch.isfinite(y).all() and y.shape == (8, 1, 64, 64)
    assert all(v.device.type == "cuda" for v in aug.last_params.values())
