"""What an epoch reports: TensorBoard gets numbers only, each collection's counts under their own tags."""

from __future__ import annotations

from train.epoch_log import mix_summary, scalars


def test_scalars_are_numbers_with_each_collections_counts_under_its_own_tag():
    row = {
        "epoch": 3,
        "train_loss": 0.5,
        "rank_steps": [4, 4],
        "collections": {"db": {"drawn": 43, "distinct": 38, "size": 38, "strata": {"all": {}}}},
        "val_collections": {"db": {"films": 5, "accuracy": 0.8, "macro_f1": 0.7}},
    }
    assert scalars(row) == {
        "epoch/train_loss": 0.5,
        "collections/db/drawn": 43,
        "collections/db/distinct": 38,
        "collections/db/val_accuracy": 0.8,
    }


def test_the_mix_line_names_draws_distinct_films_strata_and_validation():
    collections = {
        "db": {"drawn": 43, "distinct": 30, "size": 38, "strata": {"a": {"drawn": 22}, "b": {"drawn": 21}}},
        "site": {"drawn": 21, "distinct": 19, "size": 19, "strata": {"all": {"drawn": 21}}},
    }
    line = mix_summary(collections, {"db": {"accuracy": 0.75}})
    assert line == "db: 43 drawn, 30/38 distinct [a 22 b 21], val acc 0.750 | site: 21 drawn, 19/19 distinct"
