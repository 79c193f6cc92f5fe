"""Metric maths on arrays, NumPy, scikit-learn and SciPy only: threshold metrics, the operating point,
patient bootstrap intervals, calibration, and its refitting at a site.

May import: cxr_tfdata.core. No TensorFlow at import.
"""
