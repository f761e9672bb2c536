"""Search in a Milvus collection: on milvus-lite (a local file) or on a Milvus server by URI.

`MilvusIndex` (`pip install memory3-lm[milvus]`) keeps the vectors in a Milvus collection
of two fields, the int64 reference id (primary key) and the float vector, with one vector
index whose type and parameters come from the recipe. The same code talks to

- **milvus-lite**, when `uri` is a path ending in `.db` (a folder that milvus-lite keeps;
  it runs inside this process): `FLAT` (exact) and `IVF_FLAT`;
- **a Milvus server or cluster**, when `uri` is `http://`, `https://`, `tcp://` or
  `unix:`: also `IVF_PQ`, `HNSW` and `DISKANN`. Its token, if it needs one, is read from the
  environment variable named by `token_env` and never written to a file.

```python
index = MilvusIndex(384, uri="bank/milvus.db", index_type="IVF_FLAT",
                    index_params={"nlist": 1024}, search_params={"nprobe": 32})
index.add(embeddings, ids); index.build()       # build() flushes: Milvus indexes by itself
scores, ids = index.search(queries, k=5)
index.save("bank/index")                        # index.json: where and which collection
MilvusIndex.load("bank/index")                  # reconnects, checks the collection
```

**Copy on write.** A saved folder names one collection, and nothing changes it after the
save: a handle whose collection a folder names (after `save`, `load`, unpickling) copies it
into a new collection at its first `add` or `remove`, and `save` to another folder names
the copy. So after `m3 edit` (load, change, save to a new folder, rename the manifest) a
reader of the old folder searches the old knowledge base and a reader of the new folder
the new one, never a mix. `discard(folder)` retires a folder's collection, dropped by a
later `discard` after `retire_after` seconds. milvus-lite serves one process per file; a
server, every process (that path is the same code, tested on milvus-lite only). The
guide: [Index backends](../../guides/indexes.md#milvus-an-index-on-a-vector-database).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import MemoryIndex, SearchResult
from m3.backends.checks import (
    MANIFEST,
    as_index_ids,
    as_vectors,
    check_dim,
    check_k,
    check_metric,
    empty_result,
    missing_error,
    read_manifest,
)
from m3.backends.milvus_client import connect, disconnect, pymilvus, settle_lite
from m3.core.checks import check_choice, check_int
from m3.core.errors import UserError

#: Milvus's metric for each of m3's: cosine scores normalised vectors, dot the raw ones.
MILVUS_METRICS = {"cosine": "COSINE", "dot": "IP"}

#: Index types: (build parameters, search parameters, whether milvus-lite runs it).
INDEX_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...], bool]] = {
    "FLAT": ((), (), True),
    "IVF_FLAT": (("nlist",), ("nprobe",), True),
    "IVF_PQ": (("nlist", "m", "nbits"), ("nprobe",), False),
    "HNSW": (("M", "efConstruction"), ("ef",), False),
    "DISKANN": ((), ("search_list",), False),
}

#: Most neighbours (and queries) one Milvus search request takes.
MAX_TOPK = 16_384

#: Collection property that records what m3 wrote (dimension, metric, embedder, uid).
STAMP = "m3.index"

#: Collection property set by `discard`: when the collection was retired (Unix seconds).
RETIRED = "m3.retired_at"

_ID, _VECTOR = "id", "vector"
_SERVER_SCHEMES = ("http://", "https://", "tcp://", "unix:")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")


def _fingerprint(stamp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:32]


class MilvusIndex(MemoryIndex):
    """A Milvus collection searched by reference id: milvus-lite or a server, copy on write.

    Nothing is opened at construction (checking a recipe builds the index): the first call
    that needs the collection connects, with `timeout`. Vectors are kept as m3 scores them
    (fp32, L2-normalised for "cosine"); Milvus returns the similarity as the score.

    Args:
        dim: Dimension of the embeddings.
        metric: "cosine" (Milvus COSINE on normalised vectors) or "dot" (Milvus IP).
        uri: A milvus-lite file (a path ending in `.db`, relative to the working directory)
            or a server's URI (`http://host:19530`; no credentials in it).
        collection: Prefix of the collections' names: each one is `<collection>_<16 hex>`.
        index_type: "FLAT" (exact) or "IVF_FLAT"; on a server also "IVF_PQ", "HNSW",
            "DISKANN".
        index_params: Build parameters of the index type (IVF: `nlist`; IVF_PQ: `m`,
            `nbits`; HNSW: `M`, `efConstruction`); Milvus's defaults for those not given.
        search_params: Search parameters (IVF: `nprobe`; HNSW: `ef`; DISKANN:
            `search_list`).
        embedder_fingerprint: The fingerprint of the embedder whose vectors the index holds,
            recorded on the collection and checked when a folder is loaded ("" for none).
        token_env: Environment variable that holds a server's token (unset: no token).
        timeout: Seconds to wait for the server to answer (connecting, small requests).
        request_timeout: Seconds one insert, delete, search, flush or load may take.
        batch_size: Most vectors per insert request (fewer when they would pass 8 MiB),
            and per page when copying.
        retire_after: Seconds a collection retired by `discard` stays searchable.
    """

    def __init__(
        self,
        dim: int,
        *,
        metric: str = "cosine",
        uri: str = "milvus.db",
        collection: str = "m3_index",
        index_type: str = "FLAT",
        index_params: dict[str, int | float | str] | None = None,
        search_params: dict[str, int | float | str] | None = None,
        embedder_fingerprint: str = "",
        token_env: str = "MILVUS_TOKEN",
        timeout: float = 10.0,
        request_timeout: float = 600.0,
        batch_size: int = 4096,
        retire_after: float = 3600.0,
    ):
        owner = "MilvusIndex"
        self.dim = check_dim(dim, where=owner)
        self.metric = check_metric(metric, where=owner)
        if not isinstance(uri, str) or not (uri.endswith(".db") or uri.startswith(_SERVER_SCHEMES)):
            raise UserError(
                f"{owner}: uri must be a milvus-lite file ending in .db or a server URI "
                f"starting with {', '.join(_SERVER_SCHEMES)}; got {uri!r}"
            )
        self.lite = uri.endswith(".db") and not uri.startswith(_SERVER_SCHEMES)
        if not self.lite and "@" in uri.split("//", 1)[-1].split("/", 1)[0]:
            raise UserError(
                f"{owner}: put no credentials in uri (it is written to index.json); set the "
                f"token in the environment variable {token_env} instead"
            )
        self.uri = os.path.abspath(uri) if self.lite else uri
        if not isinstance(collection, str) or not _NAME.fullmatch(collection):
            raise UserError(
                f"{owner}: collection must be a name of letters, digits and underscores that "
                f"does not start with a digit, got {collection!r}"
            )
        self.collection = collection
        self.index_type = check_choice(owner, "index_type", index_type, INDEX_TYPES)
        build_keys, search_keys, on_lite = INDEX_TYPES[index_type]
        if self.lite and not on_lite:
            lite_types = [name for name, (_, _, ok) in INDEX_TYPES.items() if ok]
            raise UserError(
                f"{owner}: index_type {index_type} needs a Milvus server; milvus-lite "
                f"({uri}) runs {lite_types}"
            )
        self.index_params = _check_params(index_params, build_keys, "index_params", index_type)
        self.search_params = _check_params(search_params, search_keys, "search_params", index_type)
        if not isinstance(embedder_fingerprint, str):
            raise UserError(f"{owner}: embedder_fingerprint must be a string")
        self.embedder_fingerprint = embedder_fingerprint
        self.token_env = token_env
        for name, value in (("timeout", timeout), ("request_timeout", request_timeout)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{owner}: {name} must be a positive number of seconds")
        self.timeout, self.request_timeout = float(timeout), float(request_timeout)
        self.batch_size = check_int(owner, "batch_size", batch_size, low=1)
        self._rows_per_request = max(1, min(self.batch_size, 2**23 // (4 * self.dim)))
        self.retire_after = float(retire_after)
        pymilvus()  # fail at construction, not after hours of encoding, when it is missing
        self._client: Any = None
        self._collection: str | None = None  # the collection this handle searches
        self._frozen = False  # a saved folder or another handle names it: copy before changes
        self._scratch = False  # this handle made it and nothing else names it: close drops it
        self._saved_to: str | None = None  # the folder that names it
        self._closer: weakref.finalize | None = None

    def __repr__(self) -> str:
        return (
            f"MilvusIndex(dim={self.dim}, metric={self.metric!r}, uri={self.uri!r}, "
            f"index_type={self.index_type!r}, collection={self._collection!r})"
        )

    def _config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "metric": self.metric,
            "uri": self.uri,
            "collection": self.collection,
            "index_type": self.index_type,
            "index_params": self.index_params,
            "search_params": self.search_params,
            "embedder_fingerprint": self.embedder_fingerprint,
            "token_env": self.token_env,
            "timeout": self.timeout,
            "request_timeout": self.request_timeout,
            "batch_size": self.batch_size,
            "retire_after": self.retire_after,
        }

    # --- connection ----------------------------------------------------------------------

    def _open(self) -> Any:
        if self._client is None:
            token = os.environ.get(self.token_env, "") if not self.lite else ""
            self._client = connect(self.uri, lite=self.lite, timeout=self.timeout, token=token)
            self._closer = weakref.finalize(self, disconnect, self.uri, self.lite)
        return self._client

    def close(self) -> None:
        """Let go of the connection (the last handle of a milvus-lite file stops its server).

        A collection this handle made that no saved folder names (vectors never saved, or
        a copy made for changes never saved) is dropped, as an in-memory index is forgotten.
        The handle reconnects when used again.
        """
        if self._client is None:
            return
        if self._scratch and self._collection is not None:
            with contextlib.suppress(Exception):
                self._client.drop_collection(self._collection, timeout=self.timeout)
            self._collection, self._scratch = None, False
        self._client = None
        if self._closer is not None:
            self._closer()  # disconnect, once

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stamp(self) -> dict[str, Any]:
        return {"class": "MilvusIndex", "dim": self.dim, "metric": self.metric,
                "embedder_fingerprint": self.embedder_fingerprint,
                "uid": uuid.uuid4().hex}  # fmt: skip

    def _create(self) -> str:
        """Make a new empty collection; returns its name."""
        client, module = self._open(), pymilvus()
        name = f"{self.collection}_{uuid.uuid4().hex[:16]}"
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(_ID, module.DataType.INT64, is_primary=True)
        schema.add_field(_VECTOR, module.DataType.FLOAT_VECTOR, dim=self.dim)
        index = client.prepare_index_params()
        # Nested under "params": the form both milvus-lite and the server read.
        params = {"params": dict(self.index_params)} if self.index_params else None
        index.add_index(field_name=_VECTOR, index_type=self.index_type,
                        metric_type=MILVUS_METRICS[self.metric], params=params)  # fmt: skip
        client.create_collection(
            name, schema=schema, index_params=index, consistency_level="Strong",
            properties={STAMP: json.dumps(self._stamp(), sort_keys=True)}, timeout=self.timeout,
        )  # fmt: skip
        return name

    def _writable(self) -> str:
        """The collection to change: made on first use, copied first when others name it."""
        if self._collection is None:
            self._collection, self._scratch = self._create(), True
        elif self._frozen:
            source, client = self._collection, self._open()
            target = self._create()
            try:
                for rows in self._pages(source, [_ID, _VECTOR]):
                    client.insert(target, rows, timeout=self.request_timeout)
            except BaseException:  # a half copy is nobody's: drop it
                with contextlib.suppress(Exception):
                    client.drop_collection(target, timeout=self.timeout)
                raise
            self._collection, self._frozen, self._scratch = target, False, True
            self._saved_to = None
        return self._collection

    def _pages(self, collection: str, fields: list[str]) -> Iterator[list[dict[str, Any]]]:
        iterator = self._open().query_iterator(
            collection,
            batch_size=self._rows_per_request,
            output_fields=fields,
            timeout=self.request_timeout,
        )
        try:
            while rows := iterator.next():
                yield rows
        finally:
            iterator.close()

    # --- contents ------------------------------------------------------------------------

    def __len__(self) -> int:
        if self._collection is None:
            return 0
        rows = self._open().query(self._collection, filter="", output_fields=["count(*)"],
                                  timeout=self.request_timeout)  # fmt: skip
        return int(rows[0]["count(*)"])

    def ids(self) -> Tensor:  # noqa: D102 (MemoryIndex.ids)
        if self._collection is None:
            return torch.zeros(0, dtype=torch.int64)
        parts = [np.array([row[_ID] for row in rows], dtype=np.int64)
                 for rows in self._pages(self._collection, [_ID])]  # fmt: skip
        return torch.from_numpy(np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64))

    def add(self, embeddings: Tensor, ids: Tensor) -> None:
        """Add vectors; re-adding an id replaces its vector (Milvus upsert).

        Args:
            embeddings: `(N, dim)` float vectors.
            ids: `(N,)` distinct int64 reference ids ≥ 0.
        """
        where = "MilvusIndex.add"
        vectors = as_vectors(embeddings, self.dim, metric=self.metric, name="embeddings",
                             where=where)  # fmt: skip
        ids_np = as_index_ids(ids, vectors.shape[0], where=where)
        if ids_np.size == 0:
            return
        collection, client = self._writable(), self._open()
        step = self._rows_per_request
        for start in range(0, ids_np.size, step):
            rows = [{_ID: int(i), _VECTOR: v} for i, v in
                    zip(ids_np[start : start + step], vectors[start : start + step],
                        strict=True)]  # fmt: skip
            client.upsert(collection, rows, timeout=self.request_timeout)

    def remove(self, ids: Tensor) -> None:
        """Remove vectors by id.

        Args:
            ids: `(N,)` int64 reference ids, each stored.

        Raises:
            MissingReferenceError: For an id that is not in the index (nothing is removed).
        """
        where = "MilvusIndex.remove"
        ids_np = as_index_ids(ids, -1, where=where)
        if ids_np.size == 0:
            return
        found = self._present(ids_np)
        if found.size < ids_np.size:
            slots = np.where(np.isin(ids_np, found), 0, -1)
            raise missing_error(ids_np, slots, where=f"the index ({self._collection})")
        collection, client = self._writable(), self._open()
        for start in range(0, ids_np.size, self.batch_size):
            part = ids_np[start : start + self.batch_size].tolist()
            client.delete(collection, ids=part, timeout=self.request_timeout)

    def _present(self, ids: np.ndarray) -> np.ndarray:
        if self._collection is None:
            return np.zeros(0, np.int64)
        found = []
        for start in range(0, ids.size, self.batch_size):
            part = ids[start : start + self.batch_size].tolist()
            rows = self._open().query(
                self._collection, filter=f"{_ID} in {part}", output_fields=[_ID],
                timeout=self.request_timeout,
            )  # fmt: skip
            found += [row[_ID] for row in rows]
        return np.asarray(found, dtype=np.int64)

    def build(self) -> None:
        """Flush the inserted vectors, so that Milvus seals them and builds its index on them.

        Milvus builds and maintains the index itself; searches reflect every change at once
        (strong consistency) with or without this call. On milvus-lite it also waits for
        the background compaction and index build that the flush starts, so that searches
        after it use the index and give the same results every time.
        """
        if self._collection is not None:
            self._open().flush(self._collection, timeout=self.request_timeout)
            if self.lite:
                settle_lite(self.uri, self._collection)

    # --- searching -----------------------------------------------------------------------

    def search(self, queries: Tensor, k: int) -> SearchResult:
        """The `k` most similar stored vectors of each query (exactly with FLAT).

        Args:
            queries: `(Q, dim)` float vectors.
            k: Neighbours per query; slots without a hit (k beyond the index size, beyond
                Milvus's limit of 16,384, or beyond what the searched lists hold) have id −1
                and score −inf.

        Returns:
            `(Q, k)` float32 scores (best first) and int64 ids.

        Raises:
            UserError: When the collection is gone (its folder was discarded).
        """
        where = "MilvusIndex.search"
        k = check_k(k, where=where)
        q = as_vectors(queries, self.dim, metric=self.metric, name="queries", where=where)
        result = empty_result(q.shape[0], k)
        if self._collection is None or q.shape[0] == 0:
            return result
        client, limit = self._open(), min(k, MAX_TOPK)
        params = {"metric_type": MILVUS_METRICS[self.metric], "params": dict(self.search_params)}
        step = max(1, min(MAX_TOPK, 2**22 // limit))  # nq · topk stays within what Milvus takes
        for start in range(0, q.shape[0], step):
            try:
                found = client.search(self._collection, data=list(q[start : start + step]),
                                      limit=limit, search_params=params, output_fields=[_ID],
                                      timeout=self.request_timeout)  # fmt: skip
            except Exception as error:
                if not client.has_collection(self._collection, timeout=self.timeout):
                    raise UserError(
                        f"{where}: collection {self._collection} is gone from {self.uri} "
                        "(its index folder was discarded after an edit): open the bank again"
                    ) from None
                raise error
            for row, hits in enumerate(found, start=start):
                n = len(hits)
                result.ids[row, :n] = torch.tensor([h[_ID] for h in hits], dtype=torch.int64)
                result.scores[row, :n] = torch.tensor([h["distance"] for h in hits])
        return result

    # --- persistence ---------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write `index.json`: the connection, the collection, its settings and fingerprint.

        The collection itself stays where it is (in the milvus-lite file or on the server);
        from now on this handle copies it before changing it. A milvus-lite path is written
        relative to `directory`, so a bank folder that holds its `.db` can move.

        Args:
            directory: Where to write (created if needed).
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        folder = str(path.resolve())
        if self._collection is None or (self._frozen and self._saved_to != folder):
            self._writable()  # each folder names a collection of its own
        collection, client = str(self._collection), self._open()
        client.flush(collection, timeout=self.request_timeout)
        described = client.describe_collection(collection, timeout=self.timeout)
        stamp = json.loads(described["properties"][STAMP])
        config = self._config()
        if self.lite:
            config["uri"] = os.path.relpath(self.uri, folder)
        manifest = {"class": "MilvusIndex", "config": config, "lite": self.lite,
                    "collection_name": collection, "stamp": stamp,
                    "fingerprint": _fingerprint(stamp), "size": len(self)}  # fmt: skip
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        self._frozen, self._scratch, self._saved_to = True, False, folder

    @classmethod
    def load(cls, directory: str | Path) -> MilvusIndex:
        """Reconnect to the collection a saved folder names, and check it is that one.

        Args:
            directory: Where `save` wrote.

        Returns:
            The index; its first change copies the collection (the folder's stays as is).

        Raises:
            UserError: When the server does not answer, the collection is gone, or it holds
                another dimension, metric, embedder or number of vectors than was saved.
        """
        path = Path(directory)
        manifest = read_manifest(path, cls)
        config = dict(manifest["config"])
        if manifest["lite"]:
            config["uri"] = os.path.normpath(os.path.join(path.resolve(), config["uri"]))
        index = cls(**config)
        name = manifest["collection_name"]
        index._collection, index._frozen, index._saved_to = name, True, str(path.resolve())
        try:
            index._check_collection(manifest, where=str(directory))
        except BaseException:
            index.close()
            raise
        return index

    def _check_collection(self, manifest: dict[str, Any], *, where: str) -> None:
        client, name = self._open(), manifest["collection_name"]
        if not client.has_collection(name, timeout=self.timeout):
            raise UserError(
                f"{where}: collection {name} is not on {self.uri} (dropped, or another "
                "milvus-lite file or server?)"
            )
        properties = client.describe_collection(name, timeout=self.timeout)["properties"]
        if STAMP not in properties:
            raise UserError(f"{where}: collection {name} on {self.uri} was not written by m3")
        stamp, saved = json.loads(properties[STAMP]), manifest["stamp"]
        for key, label in (("dim", "dimension"), ("metric", "metric"),
                           ("embedder_fingerprint", "embedder fingerprint")):  # fmt: skip
            if stamp.get(key) != saved.get(key):
                raise UserError(
                    f"{where}: collection {name} on {self.uri} holds {label} "
                    f"{stamp.get(key)!r}, the index folder expects {saved.get(key)!r}"
                )
        if _fingerprint(stamp) != manifest["fingerprint"]:
            raise UserError(
                f"{where}: collection {name} on {self.uri} has fingerprint "
                f"{_fingerprint(stamp)}, the index folder expects {manifest['fingerprint']} "
                "(the collection was made again under the same name)"
            )
        if client.get_load_state(name, timeout=self.timeout)["state"].name != "Loaded":
            client.load_collection(name, timeout=self.request_timeout)
        if (size := len(self)) != manifest["size"]:
            raise UserError(
                f"{where}: collection {name} holds {size} vectors, the index folder saved "
                f"{manifest['size']}: something changed it after the save"
            )

    @classmethod
    def discard(cls, directory: str | Path) -> None:
        """Delete a saved folder, retire its collection, drop collections retired long ago.

        The folder's collection gets the property `m3.retired_at` (now) and stays
        searchable for `retire_after` seconds; collections of the same prefix retired
        longer ago are dropped. A folder without a readable manifest is just deleted.

        Args:
            directory: A folder that `save` wrote.
        """
        path = Path(directory)
        try:
            manifest = read_manifest(path, cls)
        except (UserError, OSError, ValueError):
            manifest = None
        if manifest is not None:
            config = dict(manifest["config"])
            if manifest["lite"]:
                config["uri"] = os.path.normpath(os.path.join(path.resolve(), config["uri"]))
            if not manifest["lite"] or Path(config["uri"]).exists():
                with cls(**config) as index:
                    index._retire(manifest["collection_name"])
        shutil.rmtree(path, ignore_errors=True)

    def _retire(self, name: str) -> None:
        client, now = self._open(), time.time()
        if client.has_collection(name, timeout=self.timeout):
            client.alter_collection_properties(name, properties={RETIRED: str(now)},
                                               timeout=self.timeout)  # fmt: skip
        for other in client.list_collections(timeout=self.timeout):
            if not other.startswith(self.collection + "_") or other == name:
                continue
            properties = client.describe_collection(other, timeout=self.timeout)["properties"]
            retired = properties.get(RETIRED)
            if retired is not None and now - float(retired) >= self.retire_after:
                client.drop_collection(other, timeout=self.timeout)

    def __getstate__(self) -> dict[str, Any]:
        # Carry where the collection is, not the connection; both handles copy on write now.
        if self._collection is not None:
            self._frozen, self._scratch = True, False
        return {"config": self._config(), "collection": self._collection,
                "saved_to": self._saved_to}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["config"])  # type: ignore[misc]
        self._collection, self._saved_to = state["collection"], state["saved_to"]
        self._frozen = self._collection is not None


def _check_params(
    params: Mapping[str, Any] | None, allowed: tuple[str, ...], name: str, index_type: str
) -> dict[str, int | float | str]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise UserError(f"MilvusIndex: {name} must be a mapping, got {type(params).__name__}")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise UserError(
            f"MilvusIndex: {name} of {index_type} take {list(allowed) or 'nothing'}, got {unknown}"
        )
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"MilvusIndex: {name}.{key} must be a number, got {value!r}")
    return dict(params)
