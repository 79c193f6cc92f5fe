"""Using a trained model: cxr-predict, Grad-CAM pictures, and cxr-export with the in-graph twin
of the converter's decode and resize.

May import: cxr_tfdata.files, core, metrics, data, modeling.
"""
