from __future__ import annotations

import pytest

from llmmesh import redis_server


@pytest.mark.parametrize("inherited", [None, "", "/opt/lib:", "/opt/lib"])
def test_the_library_path_has_no_empty_entry(
    monkeypatch: pytest.MonkeyPatch, inherited: str | None
) -> None:
    # An empty entry is the current directory to the dynamic loader.
    if inherited is None:
        monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    else:
        monkeypatch.setenv("LD_LIBRARY_PATH", inherited)
    found = redis_server.redis_binary()
    if found is None:
        pytest.skip("no redis-server here (make setup unpacks one)")
    _, env = found
    entries = env.get("LD_LIBRARY_PATH", "x").split(":")
    assert "" not in entries
    if inherited:
        assert "/opt/lib" in entries
