"""Fixtures shared by the whole test suite. Keep helpers in the packages (infra/, stream/)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.broker import LocalBroker


@pytest.fixture(scope="session")
def local_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """One real Tansu broker for the session, on a free port; stopped however the run ends.

    Storage is in memory and shared by all tests: use a fresh topic name per test.
    """
    with LocalBroker(state_dir=tmp_path_factory.mktemp("broker")) as broker:
        yield broker


@pytest.fixture(scope="session")
def broker(local_broker: LocalBroker) -> str:
    """Bootstrap address (host:port) of the session's broker."""
    return local_broker.bootstrap
