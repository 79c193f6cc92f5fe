"""absl entry points: the only modules that define flags. Each `main()` turns its flags into a
config and calls one library function; every binary runs through cxr_tfdata.core.runner.run_main.

May import: anything of cxr_tfdata.
"""
