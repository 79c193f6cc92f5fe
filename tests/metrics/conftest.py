"""Keeps BLAS to one thread for the metric tests: their bootstrap products are small, and extra threads only
fight over a shared machine's cores."""

import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    with threadpool_limits(limits=1):
        yield
