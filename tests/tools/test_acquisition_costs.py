"""`tools/acquisition_costs.py`: every transform timed, the figures are extra microseconds over the seed recipe."""

from __future__ import annotations

from tools.acquisition_costs import TYPICAL, acquisition_costs, describe


def test_every_transform_and_the_warp_placement_get_a_figure():
    costs = acquisition_costs(batch_size=4, stored_size=48, image_size=16, seconds=0.02)
    us = costs["us_per_image"]
    assert list(us) == ["seed_recipe", *TYPICAL, "crop_lungs", "all", "warp_at_training", "all_warp_at_training"]
    assert us["seed_recipe"] > 0 and costs["device"] == "cpu" and costs["batch_size"] == 4
    text = describe(costs)
    assert text.startswith("acquisition augmentation (cpu, batch 4, 48 -> 16 px): seed recipe ")
    assert "warp_at_training " in text
