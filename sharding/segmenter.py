"""The lung segmenter: a compact U-Net, its weights file, and the one function that turns films into masks.

It lives here, in the lowest layer, because three commands run it and must agree to the pixel:
`sharding build --lung-model` (masks for a collection that has none), `python -m train.lungs evaluate`
(Dice against drawn masks) and prediction of a lung-cropped model on image files. `train.lungs fit`
trains it. Importing this module imports torch; the build imports it only when `--lung-model` is given.

The weights file is safetensors with the architecture and the input preparation in its metadata, so the
file alone rebuilds the network; its sha256 names it wherever its masks go (sample json, manifest, card).

Inference: uint8 films [B, 1, H, W] -> /255 -> bilinear (antialiased) resize to `size` -> normalise ->
U-Net logits -> bilinear resize back to H x W -> logit > 0 (probability > 0.5) -> uint8 {0, 1}. The
build runs it with one intra-op thread, so masks do not depend on a machine's core count.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sharding.files import atomic_write
from sharding.verify import sha256_file

#: The metadata `format` of a radstream segmenter file (anything else is refused with what it is).
FORMAT = "radstream-lung-unet"
FORMAT_VERSION = 1
METADATA_KEY = "radstream"


class SegmenterError(ValueError):
    """A segmenter file is missing, not a radstream segmenter, or not the one expected; the message says which."""


@dataclass(frozen=True)
class SegmenterSpec:
    """What rebuilds the network and prepares its input (stored in the weights file's metadata)."""

    size: int = 128  # the network's input side: films are resized to it, masks back to the film's side
    width: int = 16  # channels of the first level; each level below doubles them
    depth: int = 4  # levels, so depth - 1 halvings: `size` must divide by 2 ** (depth - 1)
    mean: float = 0.5  # normalisation of the [0, 1] film (training passes the pipeline's)
    std: float = 0.25

    def __post_init__(self) -> None:
        if self.depth < 2 or self.width < 1 or self.std <= 0:
            raise SegmenterError(f"need depth >= 2, width >= 1 and std > 0, got {self}")
        if self.size < 2 ** (self.depth - 1) or self.size % 2 ** (self.depth - 1):
            raise SegmenterError(f"size {self.size} must be a multiple of 2 ** (depth - 1) = {2 ** (self.depth - 1)}")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class LungUNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) at a small width: 1-channel film -> 1-channel lung logits, same side."""

    def __init__(self, width: int = 16, depth: int = 4):
        super().__init__()
        chans = [width * 2**i for i in range(depth)]
        self.down = nn.ModuleList([_block(1, chans[0])] + [_block(a, b) for a, b in zip(chans, chans[1:])])
        self.up = nn.ModuleList([_block(b + a, a) for a, b in zip(chans[:-1], chans[1:])])
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(reversed(self.up), reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x)


def prepare(images: torch.Tensor, spec: SegmenterSpec) -> torch.Tensor:
    """uint8 [B, 1, H, W] films -> the network's normalised float32 input [B, 1, size, size]."""
    x = images.float() / 255.0
    if x.shape[-2:] != (spec.size, spec.size):
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=True)
    return (x - spec.mean) / spec.std


def masks_from_logits(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Logits [B, 1, s, s] -> uint8 masks [B, 1, height, width] in {0, 1} (probability > 0.5)."""
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
    return (logits > 0).to(torch.uint8)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then restored (the process's setting is not ours)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Segmenter:
    """A loaded segmenter: the network (eval mode, CPU), its spec and its weights file's sha256."""

    model: LungUNet
    spec: SegmenterSpec
    sha256: str

    @torch.no_grad()
    def masks(self, images: torch.Tensor, threads: int | None = 1) -> torch.Tensor:
        """uint8 films [B, 1, H, W] (a tensor on the CPU) -> uint8 masks [B, 1, H, W] in {0, 1}.

        `threads=1` (the build's setting) gives the same bytes on any machine; None keeps the process's."""
        self.model.eval()
        with torch_threads(threads or torch.get_num_threads()):
            return masks_from_logits(self.model(prepare(images, self.spec)), *images.shape[-2:])

    def predict(self, films: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 films [H, W], [B, H, W] or [B, 1, H, W] -> uint8 masks of the same shape in {0, 1}."""
        films = np.asarray(films)
        if films.dtype != np.uint8 or films.ndim not in (2, 3, 4):
            raise ValueError(f"films must be uint8 [H, W], [B, H, W] or [B, 1, H, W], got {films.dtype} {films.shape}")
        x = torch.from_numpy(np.ascontiguousarray(films)).reshape(-1, 1, *films.shape[-2:])
        out = [self.masks(x[lo : lo + batch_size]) for lo in range(0, x.shape[0], batch_size)]
        return torch.cat(out).numpy().reshape(films.shape)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-film Dice and IoU of binary masks [B, ...] (float64 [B] each; 1.0 where both are empty)."""
    p = np.asarray(pred).reshape(len(pred), -1) > 0
    t = np.asarray(truth).reshape(len(truth), -1) > 0
    inter = (p & t).sum(axis=1).astype(np.float64)
    total = p.sum(axis=1) + t.sum(axis=1).astype(np.float64)
    union = total - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2 * inter / total, 1.0)
        iou = np.where(union > 0, inter / union, 1.0)
    return dice, iou


@dataclass
class Scores:
    """Per-film Dice and IoU over a split; films whose drawn mask is empty (no mask) are counted, not scored."""

    keys: list[str]
    dice: np.ndarray
    iou: np.ndarray
    no_mask: int


def check_drawn_masks(manifest, where: str) -> None:
    """Refuse shards whose masks a segmenter predicted, or that have none: a segmenter is fitted and scored
    against drawn masks (scored against its own masks it would be perfect)."""
    if not manifest.masks:
        raise SegmenterError(f"{where} carries no lung masks: build it with --include-masks from drawn masks")
    if manifest.counts.get("masks_predicted"):
        sha = manifest.build["options"]["lung_model"]
        raise SegmenterError(
            f"{manifest.counts['masks_predicted']} of {where}'s masks were predicted by the segmenter {sha[:12]} "
            "(--lung-model): fit and score a segmenter on a collection built from drawn masks"
        )


def score_batches(segmenter: Segmenter, batches: Iterable, threads: int | None = None) -> Scores:
    """Score the segmenter on batches that carry drawn masks (`.images`, `.masks`, `.keys`, on the CPU)."""
    keys, dice, iou, no_mask = [], [], [], 0
    for batch in batches:
        if batch.masks is None:
            raise SegmenterError("these shards carry no lung masks to score against: build them with --include-masks")
        drawn = batch.masks.reshape(len(batch.keys), -1).amax(dim=1) > 0
        no_mask += int((~drawn).sum())
        if not drawn.any():
            continue
        keep = drawn.nonzero().flatten()
        d, i = dice_iou(segmenter.masks(batch.images[keep], threads).numpy(), batch.masks[keep].numpy())
        keys += [batch.keys[k] for k in keep.tolist()]
        dice.append(d)
        iou.append(i)
    empty = np.zeros(0)
    return Scores(keys, np.concatenate(dice) if dice else empty, np.concatenate(iou) if iou else empty, no_mask)


def save_segmenter(model: LungUNet, spec: SegmenterSpec, path: str | Path, card: dict | None = None) -> str:
    """Write the weights and spec to `path` (safetensors, atomically); returns the file's sha256.

    `card` (JSON-able: how it was trained, on what) goes into the metadata too."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # one metadata entry: safetensors keeps metadata in a hash map, so several entries come out in any order
    # and the same weights would give files with different digests
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": asdict(spec), "card": card or {}}
    meta = {METADATA_KEY: json.dumps(header, sort_keys=True)}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return sha256_file(path)


def read_metadata(path: str | Path) -> dict:
    """The file's radstream header (format, spec, card); SegmenterError when it is not a radstream segmenter."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SegmenterError(f"lung model {path} does not exist: train one with `python -m train.lungs fit`")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a file that is not its format
        raise SegmenterError(f"{path} is not a safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        header = json.loads(meta[METADATA_KEY])
    except (KeyError, ValueError):
        raise SegmenterError(f"{path} is not a radstream lung segmenter (metadata keys {sorted(meta)})") from None
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise SegmenterError(
            f"{path} is {header.get('format')!r} version {header.get('format_version')}, this radstream reads "
            f"{FORMAT!r} version {FORMAT_VERSION}"
        )
    return header


def _spec(meta: dict, path: Path) -> SegmenterSpec:
    try:
        return SegmenterSpec(**meta["spec"])
    except (TypeError, KeyError) as exc:
        raise SegmenterError(f"{path}: its spec {meta.get('spec')} is not one this radstream reads ({exc})") from None


def segmenter_ref(path: str | Path) -> dict:
    """{"path": absolute, "sha256"} of a segmenter file whose spec and tensor shapes fit (SegmenterError if not).

    Nothing is computed: the network is built on the meta device, so a parent about to fork its workers runs no
    torch thread pool."""
    from safetensors import safe_open

    path = Path(path)
    spec = _spec(read_metadata(path), path)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LungUNet(spec.width, spec.depth).state_dict().items()}
    with safe_open(str(path), framework="pt") as fh:
        found = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - not a dict
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise SegmenterError(f"{path}: its weights do not fit its spec {spec} (first of them: {wrong[:3]})")
    return {"path": str(path.absolute()), "sha256": sha256_file(path)}


def load_segmenter(path: str | Path, sha256: str | None = None) -> Segmenter:
    """The segmenter in `path`, in eval mode on the CPU. `sha256`: the digest it must have (a card's)."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256:
        raise SegmenterError(
            f"lung model {path} has sha256 {digest[:12]}…, not the {sha256[:12]}… this model was made with: "
            "point to the segmenter it names"
        )
    spec = _spec(meta, Path(path))
    model = LungUNet(spec.width, spec.depth)
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise SegmenterError(f"{path}: weights do not fit its spec {spec}: {exc}") from None
    return Segmenter(model.eval(), spec, digest)


def segmenter_card(path: str | Path) -> dict:
    """The training card stored in the file's metadata ({} when there is none)."""
    return read_metadata(path)["card"]


__all__ = [
    "FORMAT",
    "LungUNet",
    "Segmenter",
    "SegmenterError",
    "SegmenterSpec",
    "Scores",
    "check_drawn_masks",
    "dice_iou",
    "load_segmenter",
    "score_batches",
    "masks_from_logits",
    "prepare",
    "save_segmenter",
    "segmenter_card",
    "segmenter_ref",
    "torch_threads",
]
