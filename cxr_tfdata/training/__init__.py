"""cxr-train as library code: wiring and datasets, the per-replica step and host loops, the stage
runner, distribution, precision, the run's files in its model dir, and the operating threshold and
calibration fitted on val when a stage ends.

May import: cxr_tfdata.files, core, metrics, data, modeling, evaluation.
"""
