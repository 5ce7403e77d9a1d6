"""Shared key-value maps: named maps of key -> value that clients (``conn.kv(name)``) and
processors (``ctx.kv(name)``) read and write.

Keys are strings or integers; values are declared records or plain msgpack values (None,
bools, numbers, strings, bytes, lists, dicts, datetimes with a timezone), never pickles. A
value is stored encoded, so what a reader gets is a copy of what was written, never the
writer's object.

Without a path the maps live in memory. With ``[kv] path``, they live in a SQLite file (WAL
mode): a write is in the file when its call returns, so it survives a restart and a
``kill -9`` of the server (synchronous=NORMAL: a power failure may lose the last writes).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from mzconnector import Answer, KvRequest, RecordCodec, naive_datetime

Key = str | int
_encoder = msgspec.msgpack.Encoder()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    map TEXT NOT NULL,
    key BLOB NOT NULL,
    kind TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (map, key)
) WITHOUT ROWID
"""


class KvError(ValueError):
    """A key or value a map cannot hold."""


class KvBackend:
    """Where the maps of a workflow live, as encoded keys and values: what every backend
    shares (the encoding, the checks, ``map``), and the raw operations each implements. The
    async operations are what a client's request uses; by default they are the sync ones."""

    def __init__(self, codec: RecordCodec) -> None:
        self._codec = codec
        self._record_decoders = {
            name: msgspec.msgpack.Decoder(cls) for name, cls in codec.types.items()
        }
        self._encoder = msgspec.msgpack.Encoder()

    def close(self) -> None:
        """Let go of what it holds (a file, a connection)."""

    def map(self, name: str) -> KvMap:
        if not isinstance(name, str) or not name:
            raise KvError(f"a map's name is a non-empty string, not {name!r}")
        return KvMap(self, name)

    # -- raw operations, on encoded keys and values -------------------------------------------
    def get_raw(self, name: str, key: bytes) -> tuple[str, bytes] | None:
        raise NotImplementedError

    def set_raw(self, name: str, key: bytes, kind: str, value: bytes) -> None:
        raise NotImplementedError

    def remove_raw(self, name: str, key: bytes) -> bool:
        raise NotImplementedError

    def items_raw(self, name: str) -> list[tuple[bytes, str, bytes]]:
        raise NotImplementedError

    async def aget_raw(self, name: str, key: bytes) -> tuple[str, bytes] | None:
        return self.get_raw(name, key)

    async def aset_raw(self, name: str, key: bytes, kind: str, value: bytes) -> None:
        self.set_raw(name, key, kind, value)

    async def aremove_raw(self, name: str, key: bytes) -> bool:
        return self.remove_raw(name, key)

    async def aitems_raw(self, name: str) -> list[tuple[bytes, str, bytes]]:
        return self.items_raw(name)

    # -- encoded keys and values ------------------------------------------------------------
    def _key(self, key: Any) -> bytes:
        if type(key) not in (str, int):
            raise KvError(f"a key is a string or an integer, not a {type(key).__name__}")
        try:
            return self._encoder.encode(key)
        except OverflowError:
            raise KvError(f"the key {key} does not fit in 64 bits") from None

    def _value(self, value: Any) -> tuple[str, bytes]:
        kind = self._codec.by_class.get(type(value), "")
        try:
            encoded = self._encoder.encode(value)
        except (TypeError, OverflowError, UnicodeEncodeError) as exc:
            raise KvError(
                f"a map holds declared records and plain values (None, bool, int, float, str, "
                f"bytes, list, dict, datetime); cannot store {type(value).__name__}: {exc}"
            ) from None
        naive = None if kind else naive_datetime(value)
        if naive is not None:
            raise KvError(
                f"cannot store this value{naive}: a datetime without a timezone would come back "
                "as a string; give it one (tzinfo=datetime.timezone.utc)"
            )
        return kind, encoded

    def _checked(self, kind: str, value: bytes) -> tuple[str, bytes]:
        """A value a client sent, checked: a record of its declared type, or plain data."""
        if kind:
            decoder = self._record_decoders.get(kind)
            if decoder is None:
                raise KvError(f"no record type {kind!r} in this workflow")
            try:
                decoder.decode(value)
            except (msgspec.DecodeError, UnicodeDecodeError):
                type_name, field, problem = self._codec.explain(value, [kind])
                where = f"{type_name}.{field}" if field else type_name
                raise KvError(f"the value does not match {where}: {problem}") from None
        else:
            plain = msgspec.msgpack.decode(value)
            if _has_ext(plain):
                raise KvError("a map holds records and plain values, not msgpack extensions")
        return kind, bytes(value)

    def _load(self, kind: str, data: bytes) -> Any:
        if kind:
            decoder = self._record_decoders.get(kind)
            if decoder is None:  # the type was removed from the workflow since
                return msgspec.msgpack.decode(data)
            return decoder.decode(data)
        return msgspec.msgpack.decode(data)


class KvStore(KvBackend):
    """Every map of a workflow, in memory or in one SQLite file."""

    def __init__(self, codec: RecordCodec, path: Path | None = None) -> None:
        super().__init__(codec)
        self._path = path
        self._memory: dict[str, dict[bytes, tuple[str, bytes]]] = {}
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # the server's loop, and test code that reads the file
        if path is not None:
            try:
                self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute(_SCHEMA)
            except sqlite3.Error as exc:
                self.close()
                raise KvError(f"cannot keep the maps in {str(path)!r}: {exc}") from None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- raw operations (encoded) -----------------------------------------------------------
    def get_raw(self, name: str, key: bytes) -> tuple[str, bytes] | None:
        with self._lock:
            if self._db is None:
                return self._memory.get(name, {}).get(key)
            row = self._db.execute(
                "SELECT kind, value FROM kv WHERE map = ? AND key = ?", (name, key)
            ).fetchone()
            return None if row is None else (row[0], bytes(row[1]))

    def set_raw(self, name: str, key: bytes, kind: str, value: bytes) -> None:
        with self._lock:
            if self._db is None:
                self._memory.setdefault(name, {})[key] = (kind, value)
            else:
                self._db.execute(
                    "INSERT OR REPLACE INTO kv (map, key, kind, value) VALUES (?, ?, ?, ?)",
                    (name, key, kind, value),
                )

    def remove_raw(self, name: str, key: bytes) -> bool:
        with self._lock:
            if self._db is None:
                return self._memory.get(name, {}).pop(key, None) is not None
            cursor = self._db.execute("DELETE FROM kv WHERE map = ? AND key = ?", (name, key))
            return cursor.rowcount > 0

    def items_raw(self, name: str) -> list[tuple[bytes, str, bytes]]:
        with self._lock:
            if self._db is None:
                return [(k, *v) for k, v in self._memory.get(name, {}).items()]
            rows = self._db.execute(
                "SELECT key, kind, value FROM kv WHERE map = ?", (name,)
            ).fetchall()
            return [(bytes(k), kind, bytes(v)) for k, kind, v in rows]


def _has_ext(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, msgspec.msgpack.Ext):
            return True
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return False


class KvMap:
    """One named map, with the dict forms (``m[key]``, ``m[key] = v``, ``del m[key]``,
    ``key in m``, ``len(m)``; a missing key is a ``KeyError``)."""

    def __init__(self, store: KvBackend, name: str) -> None:
        self._store = store
        self.name = name

    def __repr__(self) -> str:
        return f"<kv map {self.name!r}>"

    def get(self, key: Key, default: Any = None) -> Any:
        found = self._store.get_raw(self.name, self._store._key(key))
        return default if found is None else self._store._load(*found)

    def set(self, key: Key, value: Any) -> None:
        self._store.set_raw(self.name, self._store._key(key), *self._store._value(value))

    def remove(self, key: Key) -> bool:
        """Remove ``key``; whether it was there."""
        return self._store.remove_raw(self.name, self._store._key(key))

    def items(self) -> list[tuple[Key, Any]]:
        load = self._store._load
        return [
            (msgspec.msgpack.decode(k), load(kind, v))
            for k, kind, v in self._store.items_raw(self.name)
        ]

    def keys(self) -> list[Key]:
        return [msgspec.msgpack.decode(k) for k, _, _ in self._store.items_raw(self.name)]

    def __getitem__(self, key: Key) -> Any:
        found = self._store.get_raw(self.name, self._store._key(key))
        if found is None:
            raise KeyError(key)
        return self._store._load(*found)

    def __setitem__(self, key: Key, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: Key) -> None:
        if not self.remove(key):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return self._store.get_raw(self.name, self._store._key(key)) is not None

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._store.items_raw(self.name))


async def kv_answer(store: KvBackend, request: KvRequest) -> Answer:
    """Carry out a client's request on a map; the answer says what it found, or what is wrong."""
    try:
        key = msgspec.msgpack.decode(request.key)
        name = store.map(request.map).name
        op = request.op
        if op == "get":
            found = await store.aget_raw(name, store._key(key))
            if found is None:
                return Answer(request.id)
            return Answer(request.id, found=True, kind=found[0], value=msgspec.Raw(found[1]))
        if op == "set":
            await store.aset_raw(
                name, store._key(key), *store._checked(request.kind, request.value)
            )
            return Answer(request.id, found=True)
        if op == "remove":
            return Answer(request.id, found=await store.aremove_raw(name, store._key(key)))
        if op == "items":
            found_items = await store.aitems_raw(name)
            items = [[msgspec.Raw(k), kind, msgspec.Raw(v)] for k, kind, v in found_items]
            return Answer(request.id, found=True, value=msgspec.Raw(_encoder.encode(items)))
        if op == "len":
            count = len(await store.aitems_raw(name))
            return Answer(request.id, found=True, value=msgspec.Raw(_encoder.encode(count)))
        return Answer(request.id, error=f"no operation {op!r} on a key-value map")
    except KvError as exc:
        return Answer(request.id, error=str(exc))
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return Answer(request.id, error=f"a key or value that does not decode: {exc}")
