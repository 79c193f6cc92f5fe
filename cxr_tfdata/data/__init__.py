"""Records to batches: parse, decode, cache, shuffle, augment, prefetch; the input benchmark's logic.

May import: cxr_tfdata.files, cxr_tfdata.core.
"""
