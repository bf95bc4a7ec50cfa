"""Acquisition-robust augmentation: each film re-acquired as another machine might have, on the device.

Hospitals differ in tone curve, contrast, exposure, sharpness, film grain and the resolution a film went
through; a model that reads those reads the hospital. Each transform here draws its own parameters per
film from a range (`AcquisitionRanges`, every range 0 = off, all off in the seed recipe), and a batch goes
through one chain of batched tensor operations, whatever its parameters:

    tone curve x**gamma -> contrast about the film's mean and brightness -> blur or sharpen (one grouped
    convolution with a per-film Gaussian) -> down-and-up resampling (a few fixed levels, chosen per film)
    -> Gaussian grain -> clip to [0, 1]

Parameters come from the step's generator after the flip and rotation draws, so a run without these keys
draws exactly what it drew before, and a run with them is a function of (seed, epoch, rank, step).
Geometry (zoom and shift: a random resized crop) is drawn here but applied by `pipeline.augment`, folded
into its one affine warp.

Everything runs in float32 on values in [0, 1]; `DeviceAugment` calls it with autocast disabled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

#: Down-and-up resampling levels: a film's factor is drawn in [1 - r, 1] and rounded to one of these steps.
RESAMPLE_LEVELS = 4
#: Taps of the blur kernel: covers +/- 3 sigma for sigma up to (BLUR_TAPS - 1) / 6.
BLUR_TAPS = 9


@dataclass(frozen=True)
class AcquisitionRanges:
    """Per-film parameter ranges; 0 turns a transform off."""

    gamma: float = 0.0  # log-gamma: gamma = exp(U(-g, g))
    contrast: float = 0.0  # contrast factor 1 + U(-c, c) about the film's mean
    brightness: float = 0.0  # additive shift U(-b, b) in [0, 1] grey units
    blur: float = 0.0  # s = U(-k, k): s > 0 blurs with sigma s px, s < 0 sharpens (unsharp mask of amount -s)
    noise: float = 0.0  # Gaussian grain with standard deviation U(0, n), in [0, 1] grey units
    resample: float = 0.0  # through a resolution factor in [1 - r, 1] and back (bilinear, antialiased down)
    zoom: float = 0.0  # random resized crop: scale 1 + U(-z, z) about the centre (applied by the warp)
    shift: float = 0.0  # and a translation U(-t, t) x the side, in x and y (applied by the warp)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{f.name} range must be a finite number >= 0, got {value}")
        limits = {"contrast": 1.0, "resample": 1.0, "zoom": 1.0, "blur": (BLUR_TAPS - 1) / 6, "shift": 0.5}
        for name, limit in limits.items():
            if getattr(self, name) >= limit and getattr(self, name) > 0:
                raise ValueError(f"{name} range must be below {limit:g}, got {getattr(self, name)}")

    @property
    def intensity(self) -> bool:
        """Whether any per-film intensity or resolution transform is on."""
        return any((self.gamma, self.contrast, self.brightness, self.blur, self.noise, self.resample))

    @property
    def geometry(self) -> bool:
        return bool(self.zoom or self.shift)

    def active(self) -> dict[str, float]:
        """The transforms that are on, with their ranges (for logs, cards and `train.bench`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


def _uniform(b: int, lo: float, hi: float, generator, device) -> torch.Tensor:
    """Drawn on the generator's device (as `sample_params` draws), then moved to the batch's."""
    where = generator.device if generator is not None else torch.device("cpu")
    return (torch.rand(b, generator=generator, device=where) * (hi - lo) + lo).to(device)


def sample_acquisition(
    b: int, ranges: AcquisitionRanges, generator: torch.Generator | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Per-film parameters (float32 [B] each) of the transforms that are on, in a fixed order."""
    out: dict[str, torch.Tensor] = {}
    if ranges.gamma:
        out["gamma"] = torch.exp(_uniform(b, -ranges.gamma, ranges.gamma, generator, device))
    if ranges.contrast:
        out["contrast"] = 1.0 + _uniform(b, -ranges.contrast, ranges.contrast, generator, device)
    if ranges.brightness:
        out["brightness"] = _uniform(b, -ranges.brightness, ranges.brightness, generator, device)
    if ranges.blur:
        out["blur"] = _uniform(b, -ranges.blur, ranges.blur, generator, device)
    if ranges.noise:
        out["noise"] = _uniform(b, 0.0, ranges.noise, generator, device)
    if ranges.resample:
        raw = _uniform(b, 1.0 - ranges.resample, 1.0, generator, device)
        step = ranges.resample / (RESAMPLE_LEVELS - 1)
        out["resample"] = 1.0 - torch.round((1.0 - raw) / step) * step
    if ranges.zoom:
        out["zoom"] = 1.0 + _uniform(b, -ranges.zoom, ranges.zoom, generator, device)
    if ranges.shift:
        out["shift_x"] = _uniform(b, -ranges.shift, ranges.shift, generator, device)
        out["shift_y"] = _uniform(b, -ranges.shift, ranges.shift, generator, device)
    return out


def _gaussian_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """[B, BLUR_TAPS] normalised 1-D Gaussians (sigma 0: a delta)."""
    half = (BLUR_TAPS - 1) / 2
    taps = torch.arange(BLUR_TAPS, device=sigma.device, dtype=torch.float32) - half
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (taps[None, :] / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def blur_batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each film blurred by its own Gaussian (separable, one grouped convolution per axis, edges replicated)."""
    b, _, h, w = x.shape
    k = _gaussian_kernels(sigma)
    pad = (BLUR_TAPS - 1) // 2
    # replicate, not reflect: any size works (reflect needs sides above the pad)
    y = F.pad(x.reshape(1, b, h, w), (pad, pad, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(b, 1, 1, BLUR_TAPS), groups=b)
    y = F.pad(y, (0, 0, pad, pad), mode="replicate")
    y = F.conv2d(y, k.view(b, 1, BLUR_TAPS, 1), groups=b)
    return y.reshape(b, 1, h, w)


def resample_batch(x: torch.Tensor, factor: torch.Tensor, levels: list[float]) -> torch.Tensor:
    """Each film through its resolution factor (one of `levels`) and back to its size."""
    h, w = x.shape[-2:]
    out = x
    for level in levels:
        if level >= 1.0:
            continue
        size = (max(2, round(h * level)), max(2, round(w * level)))
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        back = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        out = torch.where((factor - level).abs()[:, None, None, None] < 1e-4, back, out)
    return out


def acquire(
    x: torch.Tensor, params: dict[str, torch.Tensor], ranges: AcquisitionRanges, generator: torch.Generator | None
) -> torch.Tensor:
    """The intensity and resolution chain on float32 films in [0, 1] ([B, 1, H, W]); see the module docstring."""
    if "gamma" in params:
        x = x.clamp_min(0.0) ** params["gamma"][:, None, None, None]
    if "contrast" in params or "brightness" in params:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        c = params.get("contrast", torch.ones_like(mean.view(-1)))[:, None, None, None]
        x = (x - mean) * c + mean + params.get("brightness", torch.zeros_like(mean.view(-1)))[:, None, None, None]
    if "blur" in params:
        s = params["blur"]
        blurred = blur_batch(x, s.abs())
        sharpened = x + s.abs()[:, None, None, None] * (x - blurred)
        x = torch.where((s > 0)[:, None, None, None], blurred, sharpened)
    if "resample" in params:
        step = ranges.resample / (RESAMPLE_LEVELS - 1)
        x = resample_batch(x, params["resample"], [1.0 - i * step for i in range(RESAMPLE_LEVELS)])
    if "noise" in params:
        where = generator.device if generator is not None else x.device
        grain = torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device)
        x = x + grain * params["noise"][:, None, None, None]
    return x.clamp(0.0, 1.0)


def zoom_shift_matrices(params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor | None:
    """[B,3,3] source->destination pixel matrices of the random resized crop (scale about the centre, then
    shift), or None when neither is on."""
    if "zoom" not in params and "shift_x" not in params:
        return None
    ref = params.get("zoom", params.get("shift_x"))
    b = ref.shape[0]
    scale = params.get("zoom", torch.ones_like(ref))
    tx = params.get("shift_x", torch.zeros_like(ref)) * width
    ty = params.get("shift_y", torch.zeros_like(ref)) * height
    cx, cy = (width - 1) / 2, (height - 1) / 2
    m = torch.zeros(b, 3, 3, device=ref.device, dtype=torch.float32)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = scale, scale, 1.0
    m[:, 0, 2] = cx - scale * cx + tx
    m[:, 1, 2] = cy - scale * cy + ty
    return m


__all__ = [
    "AcquisitionRanges",
    "RESAMPLE_LEVELS",
    "acquire",
    "blur_batch",
    "resample_batch",
    "sample_acquisition",
    "zoom_shift_matrices",
]
