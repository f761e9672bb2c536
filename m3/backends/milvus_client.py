"""Connections to Milvus for `m3.backends.milvus_index`: one client per URI in a process.

Handles of one URI share a client (`connect` counts them, `disconnect` lets go); the last
handle of a milvus-lite file stops its in-process server and releases the file's lock.
Also: importing pymilvus lazily with an install hint (`pymilvus`), the check that another
process holds a milvus-lite file (`lite_in_use`), and the wait for milvus-lite's background
index build (`settle_lite`). Errors are `UserError`s naming the URI.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from m3.core.errors import UserError

_INSTALL_HINT = "MilvusIndex needs pymilvus and milvus-lite: pip install memory3-lm[milvus]"


class _DropIteratorNoise(logging.Filter):
    # milvus-lite implements no AllocTimestamp (its gRPC server logs the call's traceback)
    # and answers no MVCC timestamp to pymilvus's query iterator (which warns), at every
    # copy; the iterator's client-side timestamp is what a copy wants anyway.
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "mvccTs" not in message and "Method not implemented" not in message


def pymilvus() -> ModuleType:
    """Import pymilvus, or say how to install it."""
    try:
        import pymilvus
    except ImportError as error:
        raise UserError(f"{_INSTALL_HINT}; importing it failed with: {error}") from error
    for name in ("pymilvus.client.iterator.query_iterator", "grpc._server"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropIteratorNoise) for f in log.filters):
            log.addFilter(_DropIteratorNoise())
    return pymilvus


# --- connections: one client per URI in a process, shared by its handles ------------------

CLIENTS: dict[str, list[Any]] = {}  # uri -> [client, handles using it]
CLIENTS_LOCK = threading.Lock()


def lite_in_use(path: str) -> bool:
    """Whether another process holds a milvus-lite folder's lock.

    Args:
        path: The milvus-lite folder (its `.db` path).

    Returns:
        True when its `LOCK` file is locked by someone else.
    """
    lock = Path(path) / "LOCK"
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing it releases the lock just taken
    return False


def connect(uri: str, *, lite: bool, timeout: float, token: str) -> Any:
    """The process's client of a URI, opened on first use; counts one more handle on it.

    Args:
        uri: A milvus-lite folder (absolute path ending in `.db`) or a server URI.
        lite: Whether `uri` is milvus-lite's.
        timeout: Seconds to wait for the server to answer.
        token: The server's token ("" for none).

    Returns:
        A `pymilvus.MilvusClient`.

    Raises:
        UserError: When the server does not answer, or another process holds the file.
    """
    with CLIENTS_LOCK:
        if uri in CLIENTS:
            CLIENTS[uri][1] += 1
            return CLIENTS[uri][0]
        pymilvus_module = pymilvus()
        if lite:
            if lite_in_use(uri):
                raise UserError(
                    f"{uri}: this milvus-lite file is open in another process, and milvus-lite "
                    "serves one process at a time; use a Milvus server to share an index"
                )
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            client = pymilvus_module.MilvusClient(uri=uri, token=token, timeout=timeout)
        except Exception as error:  # pymilvus raises MilvusException and grpc errors
            what = "cannot open the milvus-lite file" if lite else "no Milvus server answers at"
            raise UserError(f"{what} {uri} (timeout {timeout:g} s): {error}") from None
        CLIENTS[uri] = [client, 1]
        return client


def disconnect(uri: str, lite: bool) -> None:
    """Count one handle less on a URI; the last one closes the client (and lite's server).

    Args:
        uri: As given to `connect`.
        lite: Whether `uri` is milvus-lite's.
    """
    with CLIENTS_LOCK:
        entry = CLIENTS.get(uri)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del CLIENTS[uri]
    with contextlib.suppress(Exception):
        entry[0].close()
    if lite:  # stop milvus-lite's server threads and release its file lock
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


def settle_lite(uri: str, collection: str) -> None:
    """Wait for milvus-lite's background work on a collection (it runs in this process).

    milvus-lite 3 offers no request for it; its collection's own drain point is used when it
    is there, and nothing is waited for otherwise (results stay right, only not repeatable
    to the last bit while an index build is pending).

    Args:
        uri: The milvus-lite folder.
        collection: The collection whose background work to wait for.
    """
    from milvus_lite.server_manager import server_manager_instance

    entry = getattr(server_manager_instance, "_servers", {}).get(os.path.abspath(uri))
    with contextlib.suppress(Exception):
        entry[1].get_collection(collection)._wait_for_bg()
