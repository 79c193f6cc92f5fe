"""Refusals: when a site's sample is too small to recalibrate on or estimate a prevalence from."""

# Minimums (per class, so a site with 500 PNEUMONIA and 12 NORMAL images is refused on NORMAL):
#   * MIN_IMAGES_PER_CLASS = 30. A 2-parameter logistic fit wants about 10 events per parameter at the
#     very least; 30 of the rarer class leaves room for the 1/k held out by cross-fitting (24 left with
#     k = 5). It is also where a recall is first worth stating: at 30 positives and recall 0.95 the
#     binomial standard error is 0.04, i.e. one missed image moves recall by 0.033.
#   * MIN_PATIENTS_PER_CLASS = 10. Images of one patient are not independent, so the patient is the unit
#     of both cross-fitting and the bootstrap: with 10 patients of a class and k = 5 grouped folds, every
#     held-out fold has about 2 patients of that class and every fitting part about 8; fewer leaves folds
#     with none, and a bootstrap over a handful of patients gives intervals that are mostly artefact.
#   * folds >= 2 and at most the patients of either class (StratifiedGroupKFold cannot do better).
#   * MIN_UNLABELLED_IMAGES = 100 for the EM prevalence estimate: even a perfect classifier estimates
#     a prevalence near 0.5 with standard error 0.05 from 100 images; fewer gives an interval too wide to
#     act on. With patient ids, MIN_UNLABELLED_PATIENTS = 10 for the same bootstrap reason as above.
# Without patient ids every image counts as its own patient (weaker: say so in the report).

from __future__ import annotations

import dataclasses

import numpy as np

MIN_IMAGES_PER_CLASS = 30
MIN_PATIENTS_PER_CLASS = 10
MIN_UNLABELLED_IMAGES = 100
MIN_UNLABELLED_PATIENTS = 10
DEFAULT_FOLDS = 5
CLASS_NAMES = ("NORMAL", "PNEUMONIA")


@dataclasses.dataclass(frozen=True)
class SampleCheck:
    """Whether a sample is large enough, the counts behind the verdict, and every reason it is not."""

    images_per_class: tuple[int, int]  # (NORMAL, PNEUMONIA)
    patients_per_class: tuple[int, int]  # patients with at least one image of the class
    reasons: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.reasons


class SampleRefused(ValueError):
    """A sample too small for the asked computation; .check holds the counts and every reason."""

    def __init__(self, check: SampleCheck, what: str):
        self.check = check
        super().__init__(f"{what} refused: " + "; ".join(check.reasons))


def _patients_per_class(labels: np.ndarray, groups) -> tuple[int, int]:
    if groups is None:
        return int((labels == 0).sum()), int((labels == 1).sum())
    groups = np.asarray(groups).reshape(-1)
    return tuple(int(np.unique(groups[labels == c]).size) for c in (0, 1))


def check_labelled_sample(labels, probabilities, groups=None, folds: int = DEFAULT_FOLDS,
                          min_images_per_class: int = MIN_IMAGES_PER_CLASS,
                          min_patients_per_class: int = MIN_PATIENTS_PER_CLASS) -> SampleCheck:
    """Whether a site's labelled images can be recalibrated on with `folds`-fold cross-fitting."""
    labels = np.asarray(labels).reshape(-1)
    images = (int((labels == 0).sum()), int((labels == 1).sum()))
    patients = _patients_per_class(labels, groups)
    unit = "patients" if groups is not None else "images (no patient ids: each image counted as a patient)"
    reasons = []
    for c, name in enumerate(CLASS_NAMES):
        if images[c] < min_images_per_class:
            reasons.append(f"{images[c]} {name} images, fewer than the minimum {min_images_per_class}")
        if patients[c] < min_patients_per_class:
            reasons.append(f"{patients[c]} {name} {unit}, fewer than the minimum {min_patients_per_class}")
    if folds < 2:
        reasons.append(f"cross-fitting needs at least 2 folds, got {folds}")
    elif min(patients) < folds:
        reasons.append(f"{folds} folds need at least {folds} {unit} of each class (have {min(patients)})")
    z = np.asarray(probabilities, np.float64).reshape(-1)
    if z.size and np.ptp(z) == 0:
        reasons.append("every raw probability is the same: the scores carry nothing to calibrate")
    return SampleCheck(images, patients, tuple(reasons))


def check_unlabelled_sample(probabilities, groups=None, min_images: int = MIN_UNLABELLED_IMAGES,
                            min_patients: int = MIN_UNLABELLED_PATIENTS) -> SampleCheck:
    """Whether a site's unlabelled images are enough to estimate its prevalence (counts not per class:
    the classes are unknown; images_per_class and patients_per_class hold (total, total))."""
    n = int(np.asarray(probabilities).size)
    patients = n if groups is None else int(np.unique(np.asarray(groups)).size)
    reasons = []
    if n < min_images:
        reasons.append(f"{n} unlabelled images, fewer than the minimum {min_images}")
    if groups is not None and patients < min_patients:
        reasons.append(f"{patients} patients, fewer than the minimum {min_patients}")
    return SampleCheck((n, n), (patients, patients), tuple(reasons))


def require(check: SampleCheck, what: str) -> SampleCheck:
    """check, or SampleRefused naming `what` and every reason."""
    if not check.ok:
        raise SampleRefused(check, what)
    return check
