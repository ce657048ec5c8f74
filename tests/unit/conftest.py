"""Unit tests run on any host, as any user: they must not touch this host's networks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def networks_elsewhere(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Network definitions in a scratch directory, and nftables never written: a unit test that
    reaches the network store by accident cannot change this host's."""
    from cgctl.network import store

    monkeypatch.setenv("CGCTL_NETWORK_DIR", str(Path(tmp_path_factory.mktemp("networks"))))

    def refuse(networks: list[store.Network]) -> None:
        raise AssertionError("a unit test tried to write this host's nftables table")

    monkeypatch.setattr(store, "write_isolation", refuse)
    yield
