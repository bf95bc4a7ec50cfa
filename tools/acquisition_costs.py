"""What each acquisition augmentation and the lung crop cost per image (`python -m tools.bench_train` prints it).

`warp_at_training` is the seed recipe with `data.warp_at=training` (the warp after the resize): a saving
when negative; `all_warp_at_training` is `all` with it.

Each transform is timed alone on top of the seed recipe's train augmentation (flip, rotation, resize,
normalisation) at the benchmark's batch and sizes, then all of them together; the figure is the extra
microseconds per image over the seed recipe, on the best device present.
"""

from __future__ import annotations

import time

import torch

from pipeline.acquisition import AcquisitionRanges
from pipeline.augment import DeviceAugment

#: A typical range per transform (the ones configs/robust.yaml would set).
TYPICAL = {
    "gamma": 0.4,
    "contrast": 0.3,
    "brightness": 0.1,
    "blur": 1.0,
    "noise": 0.04,
    "resample": 0.6,
    "zoom": 0.15,
    "shift": 0.06,
}


def seconds_per_call(aug: DeviceAugment, x: torch.Tensor, m: torch.Tensor | None, seconds: float) -> float:
    """Seconds one `aug(x, m)` call takes, over `seconds` of calls after one warm-up (device synchronised)."""
    g = torch.Generator(device=x.device).manual_seed(0)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    aug(x, m, generator=g)
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        aug(x, m, generator=g)
        n += 1
    sync()
    return (time.perf_counter() - start) / n


def _us_per_image(aug: DeviceAugment, x: torch.Tensor, m: torch.Tensor, seconds: float) -> float:
    return seconds_per_call(aug, x, m, seconds) / x.shape[0] * 1e6


def acquisition_costs(batch_size: int, stored_size: int, image_size: int, seconds: float = 1.0) -> dict:
    """{transform: extra us/image over the seed recipe}, plus `seed_recipe` (its own us/image) and `all`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = batch_size if device.type == "cuda" else min(batch_size, 32)
    x = torch.randint(0, 256, (batch, 1, stored_size, stored_size), dtype=torch.uint8, device=device)
    m = torch.zeros_like(x)
    m[:, :, stored_size // 5 : -stored_size // 5, stored_size // 6 : -stored_size // 6] = 1

    def timed(**kw) -> float:
        return _us_per_image(DeviceAugment(train=True, image_size=image_size, **kw).to(device), x, m, seconds)

    base = timed()
    out = {"seed_recipe": base}
    for name, value in TYPICAL.items():
        out[name] = timed(acquisition=AcquisitionRanges(**{name: value})) - base
    out["crop_lungs"] = timed(crop="lungs") - base
    out["all"] = timed(acquisition=AcquisitionRanges(**TYPICAL), crop="lungs") - base
    # negative when it saves: the seed recipe's warp moved after the resize (data.warp_at=training)
    out["warp_at_training"] = timed(warp_at="training") - base
    out["all_warp_at_training"] = (
        timed(acquisition=AcquisitionRanges(**TYPICAL), crop="lungs", warp_at="training") - base
    )
    return {
        "device": device.type,
        "batch_size": batch,
        "stored_size": stored_size,
        "image_size": image_size,
        "us_per_image": {k: round(v, 1) for k, v in out.items()},
    }


def describe(costs: dict) -> str:
    us = costs["us_per_image"]
    extra = ", ".join(f"{k} {v:+.0f}" for k, v in us.items() if k != "seed_recipe")
    return (
        f"acquisition augmentation ({costs['device']}, batch {costs['batch_size']}, {costs['stored_size']} -> "
        f"{costs['image_size']} px): seed recipe {us['seed_recipe']:.0f} us/img; extra us/img: {extra}"
    )


__all__ = ["TYPICAL", "acquisition_costs", "describe", "seconds_per_call"]
