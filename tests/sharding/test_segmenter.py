"""The lung segmenter's file, inference and scores (sharding/segmenter.py), without training one."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

from sharding.segmenter import (
    LungUNet,
    Segmenter,
    SegmenterError,
    SegmenterSpec,
    check_drawn_masks,
    dice_iou,
    load_segmenter,
    masks_from_logits,
    prepare,
    save_segmenter,
    score_batches,
    segmenter_card,
    segmenter_ref,
)
from sharding.verify import sha256_file

SMALL = SegmenterSpec(size=32, width=4, depth=3)


def _saved(tmp_path, seed=0, spec=SMALL):
    torch.manual_seed(seed)
    model = LungUNet(spec.width, spec.depth)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode differs from train mode
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        films = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (2, 1, 32, 32), dtype=np.uint8))
        model.head.bias -= model.eval()(prepare(films, spec)).median()  # about half the pixels are lungs
    path = tmp_path / f"seg{seed}.safetensors"
    return model, spec, path, save_segmenter(model, spec, path, {"epoch": 3})


def test_dice_and_iou_by_hand():
    a = np.zeros((3, 10, 10), np.uint8)
    b = np.zeros((3, 10, 10), np.uint8)
    a[0, 0:4, 0:5] = 1  # 20 px
    b[0, 2:6, 0:5] = 1  # 20 px, 10 shared
    a[1, 0:2, 0:2] = 1  # only in the prediction
    dice, iou = dice_iou(a, b)
    assert dice[0] == pytest.approx(2 * 10 / 40) and iou[0] == pytest.approx(10 / 30)
    assert dice[1] == 0.0 and iou[1] == 0.0
    assert dice[2] == 1.0 and iou[2] == 1.0  # both empty: they agree


def test_the_file_round_trips_with_its_spec_card_and_digest(tmp_path):
    model, spec, path, sha = _saved(tmp_path)
    assert sha == sha256_file(path)
    loaded = load_segmenter(path, sha)
    assert loaded.spec == spec and loaded.sha256 == sha and not loaded.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    assert segmenter_card(path) == {"epoch": 3}
    assert segmenter_ref(path) == {"path": str(path.absolute()), "sha256": sha}
    assert not list(tmp_path.glob(".*tmp*")), "written through a temporary name"


def test_files_that_are_not_the_expected_segmenter_are_refused_with_what_they_are(tmp_path):
    _, _, path, sha = _saved(tmp_path)
    with pytest.raises(SegmenterError, match="does not exist.*train.lungs fit"):
        load_segmenter(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SegmenterError, match=f"^{re.escape(str(junk))} is not a safetensors file \\(SafetensorError: "):
        load_segmenter(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(SegmenterError, match="not a radstream lung segmenter \\(metadata keys \\['format'\\]\\)"):
        load_segmenter(other)
    future = tmp_path / "future.safetensors"
    save_file(
        {"w": torch.zeros(2)},
        str(future),
        metadata={"radstream": '{"format": "radstream-lung-unet", "format_version": 9}'},
    )
    msg = (
        f"^{re.escape(str(future))} is 'radstream-lung-unet' version 9, "
        "this radstream reads 'radstream-lung-unet' version 1$"
    )
    with pytest.raises(SegmenterError, match=msg):
        load_segmenter(future)
    msg = (
        f"^lung model {re.escape(str(path))} has sha256 {sha[:12]}…, not the {'0' * 12}… "
        "this model was made with: point to the segmenter it names$"
    )
    with pytest.raises(SegmenterError, match=msg):
        load_segmenter(path, "0" * 64)


def test_a_file_whose_weights_or_spec_do_not_fit_is_refused_before_any_work(tmp_path):
    from safetensors.torch import save_file

    model, spec, path, _ = _saved(tmp_path)
    assert segmenter_ref(path)["sha256"] == sha256_file(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["head.weight"] = torch.zeros(1, 5, 1, 1)
    header = '{"format": "radstream-lung-unet", "format_version": 1, "card": {}, "spec": %s}'
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={"radstream": header % json.dumps(asdict(spec))})
    with pytest.raises(SegmenterError, match="weights do not fit its spec.*head.weight"):
        segmenter_ref(bad)
    odd = tmp_path / "odd.safetensors"
    save_file(state, str(odd), metadata={"radstream": header % '{"size": 32, "kernels": 3}'})
    with pytest.raises(
        SegmenterError, match=f"^{re.escape(str(odd))}: its spec {{'size': 32, 'kernels': 3}} is not one"
    ):
        segmenter_ref(odd)
    with pytest.raises(SegmenterError, match=f"^{re.escape(str(odd))}: its spec .* is not one this radstream reads"):
        load_segmenter(odd)
    with pytest.raises(SegmenterError, match=f"^{re.escape(str(bad))}: weights do not fit its spec SegmenterSpec\\("):
        load_segmenter(bad)


def test_a_spec_that_does_not_halve_evenly_is_refused():
    with pytest.raises(SegmenterError, match="multiple of 2 \\*\\* \\(depth - 1\\) = 8"):
        SegmenterSpec(size=36, depth=4)
    SegmenterSpec(size=40, depth=4)
    SegmenterSpec(size=8, depth=4)  # the smallest: one pixel at the bottom level
    for bad in ({"depth": 1}, {"width": 0}, {"std": 0.0}):
        with pytest.raises(SegmenterError, match="^need depth >= 2, width >= 1 and std > 0, got SegmenterSpec\\("):
            SegmenterSpec(**bad)


def test_the_input_is_the_films_resized_and_normalised_by_the_spec():
    spec = SegmenterSpec(size=4, width=1, depth=2, mean=0.5, std=0.25)
    films = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    films[1] = 0
    x = prepare(films, spec)
    assert x.shape == (2, 1, 4, 4)
    assert torch.allclose(x[0], torch.full((1, 4, 4), 2.0)) and torch.allclose(x[1], torch.full((1, 4, 4), -2.0))


def test_masks_are_the_logits_above_zero_at_the_films_side():
    logits = torch.tensor([[[[-1.0, 1.0], [2.0, 0.0]]]])
    assert masks_from_logits(logits, 2, 2).tolist() == [[[[0, 1], [1, 0]]]]  # probability 0.5 exactly: not lungs
    expected = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False) > 0
    assert torch.equal(masks_from_logits(logits, 8, 8), expected.to(torch.uint8))  # pixel centres, not corners
    up = masks_from_logits(logits, 8, 8)
    assert up.shape == (1, 1, 8, 8) and up.dtype == torch.uint8
    assert up[0, 0, 0, 7] == 1 and up[0, 0, 0, 0] == 0 and up[0, 0, 7, 0] == 1


def test_prediction_is_the_same_bytes_whatever_the_batching_or_layout(tmp_path):
    _, _, path, sha = _saved(tmp_path)
    seg = load_segmenter(path, sha)
    films = np.random.default_rng(0).integers(0, 256, (5, 40, 40), dtype=np.uint8)
    whole = seg.predict(films)
    assert whole.shape == films.shape and whole.dtype == np.uint8 and set(np.unique(whole)) <= {0, 1}
    assert 0 < whole.mean() < 1, "a non-trivial mask, so the comparisons below can fail"
    assert np.array_equal(seg.predict(films, batch_size=2), whole)
    assert np.array_equal(seg.predict(films[:, None]), whole[:, None])
    assert np.array_equal(seg.predict(films[3]), whole[3])
    assert np.array_equal(load_segmenter(path).predict(films), whole)
    with pytest.raises(ValueError, match="uint8"):
        seg.predict(films.astype(np.float32))


def test_prediction_runs_on_one_thread_and_leaves_the_process_setting_alone(tmp_path):
    _, _, path, _ = _saved(tmp_path)
    seg = load_segmenter(path)
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return seg.model(x)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Segmenter(Spy(), seg.spec, seg.sha256).predict(np.zeros((1, 32, 32), np.uint8))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class Bright(nn.Module):
    """A stand-in network: lungs wherever the film is bright (its logits are the normalised grey level)."""

    def forward(self, x):
        return x


class FakeBatch:
    def __init__(self, images, masks, keys):
        self.images, self.masks, self.keys = images, masks, keys


def _batches(shift: int, films: int = 6):
    """Films whose bright square is the drawn mask, that mask shifted by `shift` px; one without a mask."""
    images = torch.zeros(films, 1, 32, 32, dtype=torch.uint8)
    masks = torch.zeros_like(images)
    for i in range(films):
        images[i, 0, 8 + i : 20 + i, 6:22] = 255
        masks[i, 0, 8 + i + shift : 20 + i + shift, 6:22] = 1
    masks[-1] = 0  # a film whose mask is missing
    keys = [f"k{i}" for i in range(films)]
    return [FakeBatch(images[:3], masks[:3], keys[:3]), FakeBatch(images[3:], masks[3:], keys[3:])]


def test_scores_count_each_film_once_and_a_shifted_mask_lowers_dice():
    seg = Segmenter(Bright(), SegmenterSpec(size=32, width=1, depth=2, mean=0.5, std=0.5), "")
    exact = score_batches(seg, _batches(0))
    assert exact.keys == ["k0", "k1", "k2", "k3", "k4"] and exact.no_mask == 1
    assert np.allclose(exact.dice, 1.0) and np.allclose(exact.iou, 1.0)
    dices = [float(score_batches(seg, _batches(s)).dice.mean()) for s in (1, 2, 4)]
    assert dices == pytest.approx([22 / 24, 20 / 24, 16 / 24])  # 12-row squares overlapping by 12 - shift rows


def test_dice_of_one_stray_pixel_is_zero_and_empty_masks_divide_nothing():
    pred = np.zeros((2, 4, 4), np.uint8)
    pred[0, 1, 1] = 1  # one predicted pixel, no drawn one: total 1
    with np.errstate(all="raise"):  # 0/0 must not even be computed unguarded
        dice, iou = dice_iou(pred, np.zeros_like(pred))
    assert dice.tolist() == [0.0, 1.0] and iou.tolist() == [0.0, 1.0]
    assert dice.dtype == np.float64 and iou.dtype == np.float64


def test_scores_count_missing_masks_in_every_batch_and_go_on_after_a_batch_without_any():
    seg = Segmenter(Bright(), SegmenterSpec(size=32, width=1, depth=2, mean=0.5, std=0.5), "")
    first, second = _batches(0)
    first.masks = torch.zeros_like(first.masks)  # a whole batch without masks, then one with two of three
    scores = score_batches(seg, [first, second])
    assert scores.no_mask == 4 and scores.keys == ["k3", "k4"]
    assert len(scores.dice) == len(scores.iou) == 2 and np.allclose(scores.iou, 1.0)
    none = score_batches(seg, [first])
    assert none.no_mask == 3 and none.keys == [] and none.dice.shape == (0,) and none.iou.shape == (0,)


def test_scores_refuse_batches_without_masks():
    seg = Segmenter(Bright(), SegmenterSpec(size=32, width=1, depth=2), "")
    msg = "^these shards carry no lung masks to score against: build them with --include-masks$"
    with pytest.raises(SegmenterError, match=msg):
        score_batches(seg, [FakeBatch(torch.zeros(1, 1, 32, 32, dtype=torch.uint8), None, ["a"])])


def test_a_segmenter_is_never_fitted_or_scored_on_predicted_or_absent_masks(phantom_shards):
    from sharding.manifest import load_manifest

    manifest = load_manifest(phantom_shards)
    check_drawn_masks(manifest, "S")
    from dataclasses import replace

    with pytest.raises(SegmenterError, match="S carries no lung masks"):
        check_drawn_masks(replace(manifest, masks=False), "S")
    predicted = replace(
        manifest,
        counts={**manifest.counts, "masks_predicted": 7},
        build={**manifest.build, "options": {**manifest.build["options"], "lung_model": "ab" * 32}},
    )
    msg = (
        "^7 of S's masks were predicted by the segmenter abababababab \\(--lung-model\\): fit and score a "
        "segmenter on a collection built from drawn masks$"
    )
    with pytest.raises(SegmenterError, match=msg):
        check_drawn_masks(predicted, "S")
    assert json.loads(manifest.to_json())["masks"] is True


#: sum of |logit - mean| of a seeded LungUNet(4, 3) in train mode on a seeded input (torch 2.14, x86-64)
PINNED_SPREAD = 289.9198


def test_the_architecture_and_its_output_are_pinned():
    """What the weights file must fit, and what a seeded network computes: a changed layer, kernel, padding,
    pooling or upsampling changes these (the same torch release gives the same digest on any x86 or ARM CPU)."""
    assert sum(p.numel() for p in LungUNet().parameters()) == 487_713  # width 16, depth 4
    small = LungUNet(4, 3)
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items() if k.endswith("weight")}
    assert shapes == {
        "down.0.0.weight": (4, 1, 3, 3), "down.0.1.weight": (4,), "down.0.3.weight": (4, 4, 3, 3),
        "down.0.4.weight": (4,), "down.1.0.weight": (8, 4, 3, 3), "down.1.1.weight": (8,),
        "down.1.3.weight": (8, 8, 3, 3), "down.1.4.weight": (8,), "down.2.0.weight": (16, 8, 3, 3),
        "down.2.1.weight": (16,), "down.2.3.weight": (16, 16, 3, 3), "down.2.4.weight": (16,),
        "up.0.0.weight": (4, 12, 3, 3), "up.0.1.weight": (4,), "up.0.3.weight": (4, 4, 3, 3),
        "up.0.4.weight": (4,), "up.1.0.weight": (8, 24, 3, 3), "up.1.1.weight": (8,),
        "up.1.3.weight": (8, 8, 3, 3), "up.1.4.weight": (8,), "head.weight": (1, 4, 1, 1),
    }  # fmt: skip
    conv_biases = [k for k in small.state_dict() if k.endswith(("0.bias", "3.bias")) and k.count(".") == 3]
    assert conv_biases == [], "convolutions before batch norm carry no bias"
    torch.manual_seed(0)
    net = LungUNet(4, 3).train()  # batch statistics: activations of order one, so every layer shows in the output
    x = torch.randn(2, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = net(x)
    assert logits.shape == (2, 1, 24, 24)
    assert float((logits - logits.mean()).abs().sum()) == pytest.approx(PINNED_SPREAD, rel=2e-5)


def test_the_input_is_resized_with_antialiasing_as_training_resizes():
    spec = SegmenterSpec(size=8, width=1, depth=2, mean=0.0, std=1.0)
    films = torch.randint(0, 256, (2, 1, 30, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(
        films.float() / 255, size=(8, 8), mode="bilinear", align_corners=False, antialias=True
    )
    torch.testing.assert_close(prepare(films, spec), expected, atol=1e-6, rtol=0)


def test_the_metadata_is_one_sorted_json_entry(tmp_path):
    from safetensors import safe_open

    _, _, path, _ = _saved(tmp_path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert list(meta) == ["radstream"]
    header = json.loads(meta["radstream"])
    assert meta["radstream"] == json.dumps(header, sort_keys=True) and list(header) == sorted(header)


def test_a_refusal_lists_at_most_three_of_the_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    model, spec, _, _ = _saved(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.update({f"extra{i}": torch.zeros(1) for i in range(5)})
    header = {"format": "radstream-lung-unet", "format_version": 1, "card": {}, "spec": asdict(spec)}
    bad = tmp_path / "extra.safetensors"
    save_file(state, str(bad), metadata={"radstream": json.dumps(header)})
    with pytest.raises(SegmenterError, match=re.escape("(first of them: ['extra0', 'extra1', 'extra2'])")):
        segmenter_ref(bad)
