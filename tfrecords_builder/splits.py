"""Patient-grouped, class-stratified validation carve-out, deterministic for a seed.

Images are first joined into groups: all images of a patient, and all byte-identical images
(whoever they belong to), so that neither a patient nor a duplicated image can end up on both
sides. Each group takes its majority class, and per class a seeded shuffle of the groups is
taken greedily until the class's val image count is as close as it gets to val_fraction.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np


def group_images(patient_ids: Sequence[str], sha256s: Sequence[str | None]) -> list[str]:
    """Union of same-patient and same-bytes images; returns each image's group name.

    A group is named after its smallest patient id, so names are stable across runs.
    """
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def union(a: str, b: str) -> None:
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)

    first_patient_with_hash: dict[str, str] = {}
    for patient, digest in zip(patient_ids, sha256s, strict=True):
        find(patient)
        if digest is not None:
            union(first_patient_with_hash.setdefault(digest, patient), patient)
    return [find(patient) for patient in patient_ids]


def _group_labels(labels: Sequence[int], groups: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Majority class per group (ties go to the lower label) and group sizes."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for label, group in zip(labels, groups, strict=True):
        counts[group][label] += 1
    majority = {g: min(c, key=lambda label: (-c[label], label)) for g, c in counts.items()}
    sizes = {g: sum(c.values()) for g, c in counts.items()}
    return majority, sizes


def choose_val_groups(
    labels: Sequence[int], groups: Sequence[str], val_fraction: float, seed: int
) -> set[str]:
    """The groups that go to val: per class about val_fraction of its images, whole groups only.

    Every class keeps at least one group in train. The result depends only on the inputs and
    the seed, not on the order of the images.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction: must be in [0, 1), got {val_fraction}")
    majority, sizes = _group_labels(labels, groups)
    chosen: set[str] = set()
    for label in sorted(set(majority.values())):
        class_groups = sorted(g for g, m in majority.items() if m == label)
        order = np.random.default_rng([seed, label]).permutation(len(class_groups))
        target = val_fraction * sum(sizes[g] for g in class_groups)
        taken, remaining = 0, len(class_groups)
        for index in order:
            group = class_groups[index]
            if remaining <= 1 or taken >= target:
                break
            # Take the group when that brings the count at least as close to the target.
            if taken + sizes[group] - target <= target - taken:
                chosen.add(group)
                taken += sizes[group]
                remaining -= 1
    return chosen
