"""cxr-evaluate as library code: the job, inference over a split or an image folder, the metric
blocks, the Markdown report, the model card (facts apart from their rendering) and the plots.

May import: cxr_tfdata.files, core, metrics, data, modeling.
"""
