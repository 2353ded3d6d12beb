"""A store's named remotes: `remotes.json` in the store folder, `{"NAME": {"url": URL}}` and nothing else.

Only URLs are kept. Credentials are never written into a store: s3fs finds them where every AWS tool
does (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws, an
instance role), and the endpoint of an S3-compatible service in AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL).
A URL holding a user name or password (`s3://key:secret@bucket`) is refused for the same reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from modelpress import fileio
from modelpress.errors import StoreError
from modelpress.safeparse import load_json
from modelpress.store.remote_backend import is_url
from modelpress.store.writing import check_name

__all__ = ["add_remote", "remove_remote", "remotes", "remote_url", "CONFIG"]

CONFIG = "remotes.json"


def remotes(root: Path) -> dict[str, str]:
    """Name -> URL of the store's remotes."""
    path = Path(root) / CONFIG
    if not path.exists():
        return {}
    body = load_json(fileio.read_file(path, 1 << 20, "remote configuration"), str(path), 1 << 20)
    if not isinstance(body, dict) or not all(isinstance(v, dict) and set(v) == {"url"} and isinstance(v["url"], str)
                                             for v in body.values()):
        raise StoreError(f"{path} is not a remote configuration: remove it and add the remotes again")
    return {name: entry["url"] for name, entry in body.items()}


def _write(root: Path, found: dict[str, str]) -> None:
    body = json.dumps({name: {"url": url} for name, url in sorted(found.items())}, indent=1, sort_keys=True)
    fileio.write_file(Path(root) / CONFIG, body.encode())


def _check_url(url: str) -> None:
    if not isinstance(url, str) or not url or "\n" in url or "\0" in url:
        raise StoreError(f"remote URL {url!r} is invalid: give s3://BUCKET/PREFIX, file:///PATH or a folder")
    if is_url(url):
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise StoreError("a remote URL must not carry credentials (they would be written into the store): "
                             "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE instead")


def add_remote(root: Path, name: str, url: str) -> None:
    check_name(name, "remote")
    _check_url(url)
    with fileio.locked(Path(root) / "lock", exclusive=False, what="the store's lock file"):
        found = remotes(root)
        if name in found and found[name] != url:
            raise StoreError(f"remote {name!r} exists ({found[name]}): remove it first (`modelpress store remote rm`)")
        found[name] = url
        _write(root, found)


def remove_remote(root: Path, name: str) -> None:
    found = remotes(root)
    if name not in found:
        raise StoreError(f"no remote named {name!r}: see `modelpress store remote ls`")
    del found[name]
    _write(root, found)


def remote_url(root: Path | None, name_or_url: str) -> str:
    """The URL of a configured remote name, or the argument itself when it is a URL or a folder's path (a name
    holds no '/')."""
    if is_url(name_or_url) or "/" in name_or_url:
        _check_url(name_or_url)
        return name_or_url
    found = remotes(root) if root is not None else {}
    if name_or_url not in found:
        raise StoreError(f"no remote named {name_or_url!r}: add it with `modelpress store remote add STORE "
                         f"{name_or_url} URL` or give a URL")
    return found[name_or_url]
