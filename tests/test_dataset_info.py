"""Registry: fold tables and label groups as in docs/method.md (#folds, #settings-and-label-groups), custom files."""

from pathlib import Path

import pytest

from dataloaders.dataset_info import DatasetDescriptionError, builtin_names, get_dataset_info, load_description

# docs/method.md#folds, fold -> (queries, support)
CHAOS_FOLDS = {
    0: ([1, 2, 3, 5], [8]),
    1: ([8, 10, 13, 15], [19]),
    2: ([19, 20, 21, 22], [31]),
    3: ([31, 32, 33, 34], [36]),
    4: ([36, 37, 38, 39], [1]),
}
SABS_FOLDS = {k: (list(range(6 * k, 6 * k + 6)), [(6 * k + 6) % 30]) for k in range(5)}


def test_builtin_names() -> None:
    assert builtin_names() == ["CHAOST2", "CMR", "PHANTOM", "SABS"]


@pytest.mark.parametrize("name,table,n_train", [("CHAOST2", CHAOS_FOLDS, 15), ("SABS", SABS_FOLDS, 23)])
def test_fold_tables_equal_spec(name: str, table: dict, n_train: int) -> None:
    info = get_dataset_info(name)
    assert info.n_folds == 5
    all_queries: list[int] = []
    for k, (queries, support) in table.items():
        fold = info.fold(k)
        assert list(fold.queries) == queries
        assert list(fold.support) == support
        assert len(fold.train) == n_train
        assert not set(fold.train) & set(fold.held_out)
        all_queries += fold.queries
    assert sorted(all_queries) == list(info.scan_ids)  # each scan is a query exactly once


def test_chaos_fold0_and_ids() -> None:
    info = get_dataset_info("CHAOST2")
    assert info.scan_ids[:6] == (1, 2, 3, 5, 8, 10)
    fold = info.fold(0)
    assert fold.queries == (1, 2, 3, 5) and fold.support == (8,)


def test_label_groups_and_test_classes() -> None:
    chaos, sabs, cmr = (get_dataset_info(n) for n in ("CHAOST2", "SABS", "CMR"))
    assert chaos.test_classes(0) == [2, 3] and chaos.test_classes(1) == [1, 4]
    assert sabs.test_classes(0) == [2, 3] and sabs.test_classes(1) == [1, 6]
    assert [cmr.test_classes(g) for g in range(3)] == [[1], [2], [3]]
    assert sabs.labels[3] == "KID_l" and chaos.labels[4] == "SPLEEN"
    assert chaos.modality == "MR" and sabs.modality == "CT"
    assert sabs.body_threshold == pytest.approx(1e-4) and chaos.body_threshold == pytest.approx(50.0001)
    with pytest.raises(DatasetDescriptionError, match="label_sets=2"):
        chaos.test_classes(2)


def test_alias_and_unknown_name() -> None:
    assert get_dataset_info("C0").name == "CMR"
    with pytest.raises(DatasetDescriptionError, match="unknown dataset 'CHAOS_T2'.*CHAOST2"):
        get_dataset_info("CHAOS_T2")


def test_fold_out_of_range_and_missing_scans() -> None:
    info = get_dataset_info("CHAOST2")
    with pytest.raises(DatasetDescriptionError, match="eval_fold=5 is out of range"):
        info.fold(5)
    with pytest.raises(DatasetDescriptionError, match=r"scans \[39\]"):
        info.fold(0, available=list(info.scan_ids[:-1]))


def test_automatic_folds_for_discovered_ids() -> None:
    info = get_dataset_info("PHANTOM")
    ids = list(range(10))
    folds = [info.fold(k, available=ids) for k in range(5)]
    assert [f.queries for f in folds] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert [f.support for f in folds] == [(2,), (4,), (6,), (8,), (0,)]
    assert folds[0].train == (3, 4, 5, 6, 7, 8, 9)


def test_custom_description_loads(tmp_path: Path) -> None:
    path = tmp_path / "mine.json5"
    path.write_text("""
    // my prostate data
    {
      name: "PROSTATE", modality: "MR", data_dir: "/data/prostate",
      labels: {"0": "BG", "1": "PZ", "2": "TZ"},
      folds: [{queries: [3, 4], support: [5]}, {queries: [5, 6], support: [3]}],
    }""")
    info = get_dataset_info(str(path))
    assert info.name == "PROSTATE" and info.eval_classes == (1, 2)
    assert info.label_groups == ((2,), (1,))  # default: each class tested alone
    assert info.test_classes(0) == [1]
    fold = info.fold(1, available=[3, 4, 5, 6])
    assert fold.queries == (5, 6) and fold.support == (3,) and fold.train == (4,)
    assert info.data_dir == Path("/data/prostate")
    assert info.body_threshold == pytest.approx(50.0001)


@pytest.mark.parametrize("body,match", [
    ('{name: "X", modality: "PET", labels: {"0": "BG", "1": "A"}}', "'modality'"),
    ('{name: "X", modality: "CT", labels: {"1": "A"}}', "background id 0"),
    ('{name: "X", modality: "CT", labels: {"0": "BG", "a": "A"}}', "not an integer"),
    ('{name: "X", modality: "CT", labels: {"0": "BG", "1": "A"}, eval_classes: [2]}', "eval_classes"),
    ('{name: "X", modality: "CT", labels: {"0": "BG", "1": "A"}, folds: {sep: [0, 3], n_folds: 1}}', "folds.sep"),
    ('{name: "X", modality: "CT", labels: {"0": "BG", "1": "A"}, label_group: [[1]]}', "unknown keys"),
    ('{name: "X", modality: "CT", labels: {"0": "BG", "1": "A"}', "not valid JSON"),
])
def test_bad_description_rejected(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "bad.json5"
    path.write_text(body)
    with pytest.raises(DatasetDescriptionError, match=match) as err:
        load_description(path)
    assert str(path) in str(err.value)
