"""Synthetic chest-X-ray-like images in the Kaggle layout, for demos and tests on a fresh machine.

Each image is a dark field with a bright torso, two darker lung fields crossed by rib arcs and a
spine; PNEUMONIA images add bright, soft opacities inside the lungs (the learnable difference).
Sizes and aspect ratios vary, file names follow every naming style of the real data, patients
hold several images, the class ratio is about 1 NORMAL : 3 PNEUMONIA, and train/test are
patient-disjoint.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class SampleImage:
    split: str
    class_name: str
    filename: str
    patient_id: str


def _patient_names(rng: np.random.Generator, label: int, patient: int, num_images: int) -> tuple[str, list[str]]:
    """The patient id and file names of one patient in one of the dataset's naming styles."""
    if label == 1:
        kind = "bacteria" if rng.random() < 0.6 else "virus"
        pid = f"person{patient}"
        numbers = rng.choice(np.arange(1, 5000), size=num_images, replace=False)
        return pid, [f"{pid}_{kind}_{n}.jpeg" for n in sorted(numbers)]
    pid = f"IM-{patient:04d}" if rng.random() < 0.5 else f"NORMAL2-IM-{patient:04d}"
    names = [f"{pid}-{i + 1:04d}.jpeg" for i in range(num_images)]
    if num_images > 1 and rng.random() < 0.3:
        names[-1] = f"{pid}-0001-{num_images:04d}.jpeg"  # the IM-0539-0001-0001 style
    return pid, names


def plan_sample(num_images: int, seed: int) -> list[SampleImage]:
    """File names, classes and patient-disjoint train/test assignment for num_images images."""
    rng = np.random.default_rng(seed)
    images: list[SampleImage] = []
    num_normal = max(2, round(num_images / 4))
    for label, quota in ((0, num_normal), (1, max(2, num_images - num_normal))):
        made, patient = 0, 0
        patients: list[list[tuple[str, str]]] = []
        while made < quota:
            patient += 1
            count = int(min(quota - made, rng.integers(1, 4)))
            pid, names = _patient_names(rng, label, patient, count)
            patients.append([(pid, n) for n in names])
            made += count
        order = rng.permutation(len(patients))
        num_test = max(1, round(TEST_FRACTION * len(patients)))
        for rank, index in enumerate(order):
            split = "test" if rank < num_test else "train"
            for pid, name in patients[index]:
                images.append(SampleImage(split, ("NORMAL", "PNEUMONIA")[label], name, pid))
    return images


def render_image(rng: np.random.Generator, pneumonia: bool) -> np.ndarray:
    """One uint8 [H, W] chest-like image of random size (180-600 px) and aspect ratio."""
    width = int(rng.integers(180, 601))
    height = int(np.clip(width * rng.uniform(0.75, 1.3), 180, 600))
    y, x = np.mgrid[-1:1:complex(0, height), -1:1:complex(0, width)]
    cx = rng.normal(0, 0.04)
    img = np.full((height, width), 25.0)
    img += 110 * (((x - cx) / 0.85) ** 2 + (y / 1.05) ** 2 < 1)  # torso
    for side in (-1, 1):
        lung = (((x - cx - side * 0.38) / 0.27) ** 2 + ((y + 0.05) / 0.62) ** 2) < 1
        img -= 75 * lung
        ribs = 0.5 + 0.5 * np.sin((y + 0.12 * np.abs(x - cx)) * rng.uniform(22, 28) + rng.uniform(0, 6))
        img += 35 * lung * (ribs > 0.75)
        if pneumonia:
            for _ in range(int(rng.integers(1, 3))):
                oy, ox, r = rng.uniform(-0.35, 0.35), cx + side * rng.uniform(0.25, 0.5), rng.uniform(0.12, 0.25)
                img += rng.uniform(70, 110) * np.exp(-(((x - ox) ** 2 + (y - oy) ** 2) / (2 * r * r)))
    img += 80 * (np.abs(x - cx) < 0.06) * (np.abs(y) < 0.95)  # spine
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_sample(output_dir: str, num_images: int, seed: int = 0) -> list[SampleImage]:
    """Writes <output_dir>/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg; refuses a non-empty output_dir."""
    if num_images < 8:
        raise ValueError(f"--num_images: must be >= 8 (both classes in train and test), got {num_images}")
    if not output_dir:
        raise ValueError("--output_dir: is required")
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"--output_dir={output_dir} is a file, not a folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"--output_dir={output_dir} exists and is not empty; nothing there is replaced")
    rng = np.random.default_rng([seed, 1])
    images = plan_sample(num_images, seed)
    for item in images:
        folder = os.path.join(output_dir, item.split, item.class_name)
        os.makedirs(folder, exist_ok=True)
        pixels = render_image(rng, item.class_name == "PNEUMONIA")
        Image.fromarray(pixels).save(os.path.join(folder, item.filename), format="JPEG", quality=90)
    return images
