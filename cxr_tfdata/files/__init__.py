"""Safe writing: atomic files, one-writer locks, whole-folder swaps, which outputs a binary may
replace, and CSV/Markdown cells that survive any file name.

May import: nothing of ours (standard library only). TensorFlow is never imported here.
"""
