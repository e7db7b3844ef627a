from __future__ import annotations

from pathlib import Path

import pytest

from llmmesh.envoymesh.envoy import admin_url


@pytest.mark.parametrize(
    ("content", "url"),
    [
        (None, ""),  # not created yet
        ("", ""),  # created, not written yet
        ("127.0.0.1:", ""),
        ("127.0.0.1:37647", "http://127.0.0.1:37647"),
        ("[::1]:9901\n", "http://[::1]:9901"),
    ],
)
def test_the_admin_address_is_read_only_once_whole(
    tmp_path: Path, content: str | None, url: str
) -> None:
    path = tmp_path / "admin"
    if content is not None:
        path.write_text(content)
    assert admin_url(path) == url
