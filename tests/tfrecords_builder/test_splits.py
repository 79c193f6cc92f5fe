"""Val carve-out invariants (patient grouping, stratification, seeds) and the split plan's leak handling."""

import collections
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxr_tfdata.core.folder_scan import SourceFile
from tfrecords_builder import plan, splits


def _dataset(num_patients_per_class, images_per_patient):
    """Per-image (patient ids, labels); patient i of class c holds images_per_patient(i) images."""
    patient_ids, labels = [], []
    for label, count in enumerate(num_patients_per_class):
        for p in range(count):
            for _ in range(images_per_patient(p)):
                patient_ids.append(f"c{label}-p{p}")
                labels.append(label)
    return patient_ids, labels


def _val_mask(patient_ids, labels, fraction, seed, sha256s=None):
    groups = splits.group_images(patient_ids, sha256s or [None] * len(patient_ids))
    chosen = splits.choose_val_groups(labels, groups, fraction, seed)
    return [g in chosen for g in groups]


@settings(max_examples=40, deadline=None)
@given(normal=st.integers(2, 40), pneumonia=st.integers(2, 80), max_images=st.integers(1, 4),
       fraction=st.floats(0.05, 0.5), seed=st.integers(0, 1000))
def test_no_patient_on_both_sides_and_each_class_keeps_train(normal, pneumonia, max_images, fraction, seed):
    patient_ids, labels = _dataset((normal, pneumonia), lambda p: 1 + p % max_images)
    mask = _val_mask(patient_ids, labels, fraction, seed)
    sides = collections.defaultdict(set)
    for pid, is_val in zip(patient_ids, mask, strict=True):
        sides[pid].add(is_val)
    assert all(len(s) == 1 for s in sides.values())
    for label in (0, 1):
        assert any(not m for m, lab in zip(mask, labels, strict=True) if lab == label)


@settings(max_examples=30, deadline=None)
@given(normal=st.integers(20, 60), pneumonia=st.integers(40, 150), fraction=st.floats(0.1, 0.4),
       seed=st.integers(0, 1000))
def test_stratified_within_one_patient_of_target(normal, pneumonia, fraction, seed):
    patient_ids, labels = _dataset((normal, pneumonia), lambda p: 1 + p % 3)  # patients of 1-3 images
    mask = _val_mask(patient_ids, labels, fraction, seed)
    for label in (0, 1):
        class_mask = [m for m, lab in zip(mask, labels, strict=True) if lab == label]
        # Whole patients of at most 3 images: the greedy choice lands within 3 images of the target.
        assert abs(sum(class_mask) - fraction * len(class_mask)) <= 3


def test_same_seed_same_split_different_seed_differs_and_order_does_not_matter():
    patient_ids, labels = _dataset((60, 180), lambda p: 1 + p % 3)
    first = _val_mask(patient_ids, labels, 0.2, seed=7)
    assert first == _val_mask(patient_ids, labels, 0.2, seed=7)
    assert first != _val_mask(patient_ids, labels, 0.2, seed=8)
    reversed_mask = _val_mask(patient_ids[::-1], labels[::-1], 0.2, seed=7)
    assert reversed_mask[::-1] == first


def test_identical_bytes_join_their_patients_into_one_group():
    groups = splits.group_images(["a", "b", "c", "d"], ["h1", "h2", "h1", None])
    assert groups[0] == groups[2] == "a"
    assert len({groups[1], groups[3], groups[0]}) == 3


def test_fraction_out_of_range_names_the_flag():
    with pytest.raises(ValueError, match="--val_fraction"):
        splits.choose_val_groups([0], ["a"], 1.0, 0)


def _source(split, label, name, tmp="/in"):
    pid = name.split("_")[0]
    return SourceFile(f"{tmp}/{split}/{('NORMAL', 'PNEUMONIA')[label]}/{name}", split, label,
                      f"{('NORMAL', 'PNEUMONIA')[label]}/{name}", pid, True)


def test_plan_drops_train_copy_of_a_test_file_and_merges_a_tiny_val():
    train = [_source("train", 1, f"person{i}_virus_1.jpeg") for i in range(20)]
    train += [_source("train", 0, f"p{i}_n.jpeg") for i in range(20, 30)]
    test = [_source("test", 1, "person90_virus_1.jpeg"), _source("test", 0, "p91_n.jpeg")]
    val = [_source("val", 1, "person95_virus_1.jpeg")]
    hashes = {f.path: f"h-{f.path}" for f in train + test + val}
    hashes[train[0].path] = hashes[test[0].path] = "same"
    by_split = {"train": train, "test": test, "val": val}
    result = plan.make_plan(by_split, hashes, "/in", plan.PlanOptions(val_fraction=0.2, min_val_images=5))
    assert result.val_source == "carved from train"
    assert result.splits["test"] == sorted(test, key=lambda f: f.filename)  # test stays as given
    kept = {f.path for s in ("train", "val") for f in result.splits[s]}
    assert train[0].path not in kept and val[0].path in kept
    assert result.dropped_leaks == [{"path": "train/PNEUMONIA/person0_virus_1.jpeg",
                                     "reason": "identical bytes in test: test/PNEUMONIA/person90_virus_1.jpeg"}]
    assert result.duplicates["across_splits"][0]["kept_in"] == "test"
    assert sum(len(v) for v in result.splits.values()) == 32  # 33 files, one leak dropped


def test_plan_reports_but_keeps_leaks_without_drop_leaks():
    train = [_source("train", 1, f"person{i}_virus_1.jpeg") for i in range(6)]
    train += [_source("train", 0, f"p{i}_n.jpeg") for i in range(6, 9)]
    test = [_source("test", 1, "person0_virus_9.jpeg"), _source("test", 0, "p9_n.jpeg")]
    hashes = {f.path: f.path for f in train + test}
    hashes[train[1].path] = hashes[test[1].path] = "same"
    result = plan.make_plan({"train": train, "test": test}, hashes, "/in",
                            plan.PlanOptions(drop_leaks=False, val_fraction=0.0))
    assert result.val_source == "none" and "val" not in result.splits
    assert len(result.splits["train"]) == 9 and result.dropped_leaks == []
    assert len(result.duplicates["across_splits"]) == 1
    assert result.patients_in_several_given_splits == [{"patient_id": "person0", "splits": ["test", "train"]}]


def test_plan_drops_train_and_val_images_of_a_patient_given_in_a_higher_split():
    train = [_source("train", 1, f"person{i}_virus_1.jpeg") for i in range(6)]
    train += [_source("train", 1, "person1_bacteria_7.jpeg"), _source("train", 1, "person2_virus_2.jpeg")]
    val = [_source("val", 1, "person2_virus_5.jpeg"), _source("val", 0, "p8_n.jpeg")]
    test = [_source("test", 1, "person1_virus_9.jpeg"), _source("test", 0, "p8_n2.jpeg")]
    test[1] = dataclasses.replace(test[1], patient_id="p8")
    hashes = {f.path: f.path for f in train + val + test}  # no identical bytes anywhere
    result = plan.make_plan({"train": train, "val": val, "test": test}, hashes, "/in",
                            plan.PlanOptions(min_val_images=1))
    assert result.val_source == "given"
    assert result.splits["test"] == sorted(test, key=lambda f: f.filename)  # test stays as given
    homes = {}
    for split, files in result.splits.items():
        for f in files:
            assert homes.setdefault(f.patient_id, split) == split, f"{f.patient_id} in two splits"
    assert [d["path"] for d in result.dropped_leaks] == [
        "train/PNEUMONIA/person1_bacteria_7.jpeg", "train/PNEUMONIA/person1_virus_1.jpeg",
        "train/PNEUMONIA/person2_virus_1.jpeg", "train/PNEUMONIA/person2_virus_2.jpeg",
        "val/NORMAL/p8_n.jpeg"]
    assert result.dropped_leaks[-1]["reason"] == "patient p8 is in test: test/NORMAL/p8_n2.jpeg"
    assert {"patient_id": "person1", "splits": ["test", "train"]} in result.patients_in_several_given_splits
