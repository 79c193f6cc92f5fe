"""manifest.json: what a build produced (per-split counts and shards) and what it left out and why."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from cxr_tfdata.core import dataset_info, patient_keys, record_schema

FORMAT_VERSION = 1
RESIZE_METHODS = {
    "squash": "PIL antialiased bilinear to image_size x image_size (aspect ratio not kept), "
              "after reduced-scale JPEG decoding",
    "pad": "PIL antialiased bilinear keeping the aspect ratio, centred on black (letterbox), "
           "after reduced-scale JPEG decoding",
}


def _split_entry(split: str, builder, outcome, dataset_dir: str, num_dropped_leaks: int) -> dict[str, Any]:
    info = builder.info.splits[split]
    shard_files = list(info.filenames)
    missing = [f for f in shard_files if not os.path.exists(os.path.join(dataset_dir, f))]
    if missing:
        raise RuntimeError(f"shards named in dataset_info.json are missing from {dataset_dir}: {missing}")
    if info.num_examples != sum(outcome.class_counts.values()):
        raise RuntimeError(f"split {split}: TFDS wrote {info.num_examples} examples, "
                           f"{sum(outcome.class_counts.values())} were generated")
    return {
        "num_examples": int(info.num_examples),
        "class_counts": dict(outcome.class_counts),
        "num_patients": len(outcome.patients),
        "num_unparsed_patient_ids": outcome.unparsed_patient_ids,
        "num_skipped": len(outcome.skipped),  # unreadable files (listed under "skipped")
        # Written but near-constant: blank or damaged behind an intact header (under "near_constant").
        "num_near_constant": len(outcome.near_constant),
        # Leaked files taken out of this split before any val carve-out (listed under "dropped_leaks").
        "num_dropped_leaks": num_dropped_leaks,
        "num_shards": len(shard_files),
        "shard_files": shard_files,
        # The bytes of each shard: what the dataset's fingerprint (dataset_info.manifest_fingerprint)
        # and cxr-verify-tfrecords check, so two datasets with the same counts never pass as one.
        "shard_sha256": [file_sha256(os.path.join(dataset_dir, f)) for f in shard_files],
    }


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MB blocks (shards are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_manifest(config, the_plan, builder, strays: list[str], unusable, dataset_dir: str,
                  build_seconds: float, shown: patient_keys.ShownPaths | None = None,
                  patient_key: patient_keys.PatientKey | None = None) -> dict[str, Any]:
    """The manifest of a finished build (layout: cxr_tfdata.core.dataset_info.read_manifest).

    unusable: scan.Unusable entries of class folders (links to folders, FIFOs, broken links).
    """
    splits = {s: _split_entry(s, builder, builder.outcomes[s], dataset_dir, the_plan.num_dropped_by_split.get(s, 0))
              for s in the_plan.splits}
    shown = shown or patient_keys.ShownPaths(config.input_dir)
    skipped = [{"path": shown.relative(p), "reason": "not inside a class folder"} for p in strays]
    skipped += [{"path": shown.relative(u.path), "reason": u.reason} for u in unusable]
    for outcome in builder.outcomes.values():
        skipped.extend(outcome.skipped)
    return {
        "format_version": FORMAT_VERSION,
        "image_size": config.image_size,
        "channels": 1,
        "encoding": config.encoding,
        "resize": config.resize,
        "resize_method": RESIZE_METHODS[config.resize],
        "class_names": list(record_schema.CLASS_NAMES),
        "splits": splits,
        "val_source": the_plan.val_source,
        "num_unparsed_patient_ids": sum(s["num_unparsed_patient_ids"] for s in splits.values()),
        "flags": json.loads(json.dumps(dataclasses.asdict(config))),  # as JSON reads it back (tuples as lists)
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "near_constant": sorted((e for o in builder.outcomes.values() for e in o.near_constant),
                                key=lambda e: e["path"]),
        # Only when DICOMs were read (manifests of JPEG/PNG folders are unchanged): each written DICOM's
        # ViewPosition and whether it had no VOI and got the percentile fallback window (README "DICOM").
        **({"dicom": sorted((e for o in builder.outcomes.values() for e in o.dicom), key=lambda e: e["path"])}
           if any(o.dicom for o in builder.outcomes.values()) else {}),
        # Only with --views: the readable files left out because their ViewPosition was not asked for.
        **({"excluded_views": sorted((e for o in builder.outcomes.values() for e in o.excluded_views),
                                     key=lambda e: e["path"])} if config.views else {}),
        "duplicates": the_plan.duplicates,
        "dropped_leaks": the_plan.dropped_leaks,
        "patients_in_several_given_splits": the_plan.patients_in_several_given_splits,
        # Patient ids are keyed hashes (README "Patient identity"): which key, by its fingerprint, never the key.
        **({"patient_ids": {"hash": f"HMAC-SHA256, first {patient_keys.PATIENT_HEX_CHARS} hex digits",
                            "key_fingerprint": patient_key.fingerprint,
                            "paths_redacted": bool(getattr(config, "redact_paths", False))}}
           if patient_key is not None else {}),
        "tfds": {"name": builder.name, "version": str(builder.version)},
        "build_seconds": round(build_seconds, 2),
    }


def write_manifest(dataset_dir: str, content: dict[str, Any]) -> str:
    path = os.path.join(dataset_dir, dataset_info.MANIFEST_FILENAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=False)
        f.write("\n")
    return path
