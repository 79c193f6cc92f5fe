"""absl entry points: the only modules that define flags."""
