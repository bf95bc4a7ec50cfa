"""Mixed precision as trained: bf16 only on GPUs that compute it natively (compute capability 8.0+)."""

from __future__ import annotations

import pytest

from train.main import choose_precision


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (6, 1)])  # V100, T4, P100-class
def test_bf16_falls_back_to_fp16_before_ampere_with_a_notice(capability):
    precision, notice = choose_precision("bf16", capability)
    assert precision == "fp16"
    assert f"compute capability {capability[0]}.{capability[1]}" in notice and "fp16" in notice


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0)])  # A100, A10/L4, L40, H100, B200
def test_bf16_stays_where_native(capability):
    assert choose_precision("bf16", capability) == ("bf16", None)


@pytest.mark.parametrize("requested", ["no", "fp16", "fp8"])
def test_other_precisions_are_left_alone(requested):
    assert choose_precision(requested, (7, 0)) == (requested, None)


def test_cpu_keeps_bf16():
    """No CUDA: torch's CPU autocast has bf16 (what `--mixed_precision bf16` tests on CPU)."""
    assert choose_precision("bf16", None) == ("bf16", None)
