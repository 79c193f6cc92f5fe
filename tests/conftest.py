"""Test ordering for the parallel run (`pytest -n auto --dist loadfile`).

Each worker takes whole files from a queue in collection order. Queuing the longest files first
(longest-processing-time-first scheduling) keeps one worker from starting a long file while the other
has run out of work, which otherwise adds a minute or more to the wall time on two cores. The list
holds the files that train models or start processes, longest first; every other file keeps its
alphabetical place after them.
"""

from __future__ import annotations

LONGEST_FIRST = (  # seconds each took in one parallel run, for reference: 172, 146, 97, 85, 85, 62, 43, 34, 29, 26
    "test_distributed.py",
    "test_train_cli.py",
    "test_contract.py",
    "test_train.py",
    "test_data_safety.py",
    "test_eval_cli.py",
    "test_export.py",
    "test_input_pipeline.py",
    "test_model.py",
    "test_builder.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within
