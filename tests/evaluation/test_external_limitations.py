"""An external test's Limitations (issue 23): where its films come from, and what could not be checked."""

from __future__ import annotations

from evaluation.report.document import limitations


def _report(per_source: dict | None, probes: bool = True, per_class: dict | None = None) -> dict:
    per_class = per_class or {"COVID": {"support": 150}, "Normal": {"support": 150}, "Viral Pneumonia": {"support": 0}}
    report = {
        "split": "all",
        "samples": sum(m["support"] for m in per_class.values()),
        "per_class": per_class,
        "external_test": {"name": "site_x"},
        "probes": {"lungs_blanked": {"shortcut": False}} if probes else {},
    }
    if per_source is not None:
        report["per_source"] = per_source
    return report


def _source(**support) -> dict:
    return {"support": sum(support.values()), "per_class": {c: {"support": n} for c, n in support.items()}}


def test_one_source_no_masks_and_an_absent_class_are_all_said():
    said = limitations(_report({"hospital-x": _source(COVID=150, Normal=150)}, probes=False))
    assert any("All 300 evaluated films come from one source (hospital-x)" in s for s in said)
    assert any("carry no lung masks" in s and "--include-masks" in s for s in said)
    assert any("No evaluated films for Viral Pneumonia" in s for s in said)
    assert not any("No external test" in s or "No patient identifiers" in s for s in said)


def test_each_class_from_its_own_source_is_named_pair_by_pair():
    said = limitations(_report({"a": _source(COVID=150), "b": _source(Normal=150)}))
    assert any("Each class of this set comes from one source (COVID from a, Normal from b)" in s for s in said)
    assert not any("lung masks" in s for s in said)


def test_classes_seen_at_several_sources_are_not_called_confounded():
    said = limitations(_report({"a": _source(COVID=100, Normal=50), "b": _source(COVID=50, Normal=100)}))
    assert not any("comes from one source" in s for s in said)


def test_films_without_a_source_are_said_to_be_of_unknown_origin():
    said = limitations(_report(None))
    assert any("name no source" in s for s in said)
    said = limitations(_report({"a": {"support": 0, "per_class": {}}}))  # a listed source with no films
    assert any("name no source" in s for s in said)


def test_an_internal_report_gets_none_of_these():
    report = _report({"hospital-x": _source(COVID=150, Normal=150)}, probes=False)
    del report["external_test"]
    said = limitations(report)
    assert not any("one source (" in s or "lung masks" in s or "name no source" in s for s in said)


def test_films_of_no_known_source_are_not_a_site():
    said = limitations(_report({"unknown": _source(COVID=100), "hospital-x": _source(COVID=50, Normal=150)}))
    assert any(s.startswith("100 of the evaluated films name no source") for s in said)
    assert not any("Each class of this set comes from one source" in s or "COVID from unknown" in s for s in said)
    assert not any("All 300 evaluated films come from one source" in s for s in said)  # 100 are of unknown origin
    said = limitations(_report({"a/unknown": _source(COVID=150, Normal=150)}))  # a collection's unknown source
    assert any(s.startswith("The evaluated films name no source") for s in said)


def test_a_model_that_reads_through_masks_refuses_shards_without_them(tmp_path):
    """Before any work, with the fix: data.crop=lungs or data.mask_lungs and shards built without masks."""
    import pytest

    from evaluation.target import ExternalShardsError, needs_masks
    from pipeline.collection import open_collections
    from train.config import Config

    from helpers.indexed_shards import write_shards

    write_shards(tmp_path / "s", masks=False)
    data = open_collections(str(tmp_path / "s"))
    cfg = Config()
    needs_masks(cfg, data, "s")  # the seed recipe reads films only
    cfg.data.crop = "lungs"
    with pytest.raises(ExternalShardsError, match=r"s carries no lung masks.*data.crop=lungs.*--include-masks"):
        needs_masks(cfg, data, "s")
    cfg.data.crop, cfg.data.mask_lungs = "none", True
    with pytest.raises(ExternalShardsError, match="data.mask_lungs"):
        needs_masks(cfg, data, "s")
