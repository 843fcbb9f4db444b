"""The pool file: one DuckDB database holding names, every LLM call, attributes, provenance and the
serialised FAISS index.

The call log is written as answers arrive (journaled at once, committed in batches: writer.py and
journal.py), so a crash loses no recorded answer; the derived tables (attributes, provenance,
index) are replaced in one transaction, so a reader never sees half of them. A pool that has never been completed lives at
`<pool>.partial` and is renamed into place when its first build finishes.

Every batch goes in as one relation (numpy columns scanned by DuckDB), never row by row: DuckDB
runs an `executemany` as one statement per row, several milliseconds each.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

if TYPE_CHECKING:  # imported where used: a finished rerun reads the pool without numpy
    import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS sources (kind VARCHAR, name VARCHAR, dataset VARCHAR, position INTEGER,
           PRIMARY KEY (kind, name))""",
    """CREATE TABLE IF NOT EXISTS requests (key VARCHAR PRIMARY KEY, source_kind VARCHAR, source_name VARCHAR,
           template VARCHAR, form VARCHAR, model VARCHAR, n INTEGER, payload VARCHAR, status VARCHAR,
           answer_call BIGINT)""",
    "CREATE SEQUENCE IF NOT EXISTS call_ids START 1",
    """CREATE TABLE IF NOT EXISTS llm_calls (id BIGINT PRIMARY KEY, request_key VARCHAR, backend VARCHAR,
           base_url VARCHAR, model VARCHAR, template VARCHAR, form VARCHAR, prompt_hash VARCHAR,
           structured VARCHAR, attempt INTEGER, status VARCHAR, error VARCHAR, response VARCHAR,
           latency_s DOUBLE, prompt_tokens INTEGER, completion_tokens INTEGER,
           created TIMESTAMP DEFAULT current_timestamp)""",
    "CREATE TABLE IF NOT EXISTS server_caps (base_url VARCHAR, model VARCHAR, structured VARCHAR, PRIMARY KEY (base_url, model))",
    "CREATE TABLE IF NOT EXISTS phrase_vectors (embedder VARCHAR, text VARCHAR, vec FLOAT[], PRIMARY KEY (embedder, text))",
    """CREATE TABLE IF NOT EXISTS provenance (attribute_id INTEGER, source_kind VARCHAR, source_name VARCHAR,
           template VARCHAR, raw_phrase VARCHAR, call_id BIGINT)""",
    "CREATE TABLE IF NOT EXISTS faiss_index (name VARCHAR PRIMARY KEY, ntotal INTEGER, description VARCHAR, blob BLOB)",
]


def partial_path(pool: Path) -> Path:
    return pool.with_name(pool.name + ".partial")


def _column(values: Sequence) -> np.ndarray:
    """A column DuckDB scans as it is: an object array keeps None as NULL and arrays as lists."""
    import numpy as np

    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


@dataclass
class CallRecord:
    request_key: str
    backend: str
    base_url: str | None
    model: str
    template: str
    form: str
    prompt_hash: str
    structured: str | None
    attempt: int
    status: str  # "ok", "unusable" (no phrases in it), "error"
    error: str | None = None
    response: str | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


_CALL_COLUMNS = [f.name for f in fields(CallRecord)]
_call_values = attrgetter(*_CALL_COLUMNS)


class PoolStore:
    """A pool's connection and every query on it. Closes on leaving a `with` block."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, read_only: bool):
        self.con = con
        self.path = path
        self.read_only = read_only
        self._closed = False
        self._next_call_id: int | None = None

    def __enter__(self) -> "PoolStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open_for_read(cls, pool: Path, allow_partial: bool = False) -> "PoolStore":
        """A finished pool, read-only; with allow_partial, an unfinished build's work file too."""
        pool = Path(pool)
        path = pool
        if not pool.exists():
            if partial_path(pool).exists():
                if not allow_partial:
                    raise UserError(f"pool {pool} is not finished (an interrupted build left "
                                    f"{partial_path(pool).name}); rerun the same `uniil attrs build` command to finish it")
                path = partial_path(pool)
            else:
                raise UserError(f"pool {pool} not found; build one with `uniil attrs build --dataset NAME --pool {pool}`")
        try:
            con = duckdb.connect(str(path), read_only=True)
        except duckdb.Error as exc:
            raise UserError(f"cannot open pool {path}: {str(exc).splitlines()[0]}") from None
        from .journal import journal_path

        if journal_path(path).exists():
            log.warning("%s holds calls of a killed build not yet in pool %s; rerun the build to commit them",
                        journal_path(path).name, path.name)
        store = cls(con, path, True)
        try:
            store._check_schema()
        except UserError:
            con.close()
            raise
        return store

    @classmethod
    def open_for_write(cls, pool: Path) -> "PoolStore":
        """The finished pool if there is one, else its `.partial` work file (created if needed)."""
        pool = Path(pool)
        target = pool if pool.exists() else partial_path(pool)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = duckdb.connect(str(target))
        except duckdb.Error as exc:
            raise UserError(f"cannot open pool {target}: {str(exc).splitlines()[0]}") from None
        store = cls(con, target, False)
        for stmt in _SCHEMA:
            con.execute(stmt)
        if store.meta("schema_version") is None:
            store.set_meta("schema_version", str(SCHEMA_VERSION))
        store._check_schema()
        from .journal import replay

        try:
            replay(store)  # the calls a killed build had journaled but not yet committed
        except BaseException:
            con.close()
            raise
        return store

    @classmethod
    def recover(cls, pool: Path) -> None:
        """Commit what a killed build left in its journal, if it left one: a reader sees every call."""
        from .journal import journal_path

        pool = Path(pool)
        work_file = pool if pool.exists() else partial_path(pool)  # the file open_for_write opens
        if journal_path(work_file).exists():
            cls.open_for_write(pool).close()

    def _check_schema(self) -> None:
        try:
            version = self.meta("schema_version")
        except duckdb.Error:
            version = None
        if version is None:
            raise UserError(f"{self.path} is not a uniil attribute pool")
        if int(version) != SCHEMA_VERSION:
            raise UserError(f"pool {self.path} has schema v{version}, this uniil reads v{SCHEMA_VERSION}; rebuild it")

    def close(self) -> None:
        """Safe to call twice (finish() closes, and so does leaving a `with` block)."""
        if self._closed:
            return
        self._closed = True
        if not self.read_only:
            self.con.execute("CHECKPOINT")
        self.con.close()

    def finish(self, pool: Path) -> None:
        """Close, and move a `.partial` work file into place: from now on the pool exists."""
        self.close()
        if self.path != pool:
            os.replace(self.path, pool)

    # -- meta ----------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])

    def check_backbone(self, backbone_id: str, cli_options: str) -> None:
        """Refuse a backbone other than the pool's; a writable pool without one records this one."""
        recorded = self.meta("backbone")
        if recorded is None:
            if not self.read_only:
                self.set_meta("backbone", backbone_id)
        elif recorded != backbone_id:
            raise UserError(f"pool {self.path.name} was built with backbone {recorded}, not {backbone_id}; "
                            f"use that backbone or another --pool (asked for: {cli_options})")

    def pool_id(self) -> str:
        """A random id given to the pool when it is created: its journal names it."""
        value = self.meta("pool_id")
        if value is None:
            import uuid

            value = uuid.uuid4().hex
            self.set_meta("pool_id", value)
        return value

    # -- finished plans --------------------------------------------------------------------------
    def _state(self) -> str:
        """Changes whenever a call is logged or the attributes are derived again."""
        calls = self.con.execute("SELECT count(*) FROM llm_calls").fetchall()[0][0]
        return f"{self.meta('derived_fingerprint')}:{calls}"

    def mark_plan_done(self, fingerprint: str) -> None:
        """Every request of this plan is answered and the attributes derived from the pool as it is now."""
        self.set_meta(f"plan:{fingerprint}", self._state())

    def plan_is_done(self, fingerprint: str) -> bool:
        """Whether a build of this plan would find nothing to ask and nothing to derive."""
        return self.meta(f"plan:{fingerprint}") == self._state()

    # -- bulk relations --------------------------------------------------------------------------
    @contextmanager
    def _relation(self, columns: dict[str, Sequence]) -> Iterator[str]:
        """The columns as one relation that SQL reads by the yielded name."""
        name = "_uniil_batch"
        self.con.complete()  # registering needs the previous statement's result finished
        self.con.register(name, {k: _column(v) for k, v in columns.items()})
        try:
            yield name
        except BaseException:
            try:  # in an aborted transaction this fails too, and would hide the statement's own error
                self.con.unregister(name)
            except duckdb.Error:
                pass  # the next register of the name replaces it
            raise
        self.con.unregister(name)

    @contextmanager
    def single_threaded(self) -> Iterator[None]:
        """For a stream of tiny statements: waking DuckDB's worker threads for each costs more CPU
        (~1.3 ms a commit of 16 calls, measured) than the statement itself."""
        self.con.execute("SET threads = 1")
        try:
            yield
        finally:
            self.con.execute("RESET threads")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT, or ROLLBACK on any exception (Ctrl-C included)."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # -- sources and requests ----------------------------------------------------------------------
    def add_sources(self, dataset: str, kind: str, names: tuple[str, ...]) -> None:
        if names:
            with self._relation({"name": names, "position": range(len(names))}) as rel:
                self.con.execute(f"INSERT OR IGNORE INTO sources SELECT ?, name, ?, position FROM {rel}", [kind, dataset])

    def add_requests(self, rows: list[tuple]) -> None:
        """rows: (key, source_kind, source_name, template, form, model, n, payload_json)."""
        rows = list({r[0]: r for r in rows}.values())  # a key twice in one statement would conflict with itself
        if rows:
            names = ["key", "source_kind", "source_name", "template", "form", "model", "n", "payload"]
            with self._relation(dict(zip(names, zip(*rows)))) as rel:
                self.con.execute(f"INSERT OR IGNORE INTO requests SELECT {', '.join(names)}, 'pending', NULL FROM {rel}")

    def answered_keys(self, keys: list[str]) -> set[str]:
        if not keys:
            return set()
        with self._relation({"key": keys}) as rel:
            found = self.con.execute(f"SELECT key FROM requests WHERE status = 'answered' AND key IN "
                                     f"(SELECT key FROM {rel})").fetchall()
        return {k for (k,) in found}

    def request_rows(self, keys: list[str]) -> dict[str, tuple]:
        if not keys:
            return {}
        with self._relation({"key": keys}) as rel:
            rows = self.con.execute(
                f"SELECT key, source_kind, source_name, template, form, model, n, payload FROM requests "
                f"WHERE key IN (SELECT key FROM {rel})").fetchall()
        return {r[0]: r for r in rows}

    def count_requests(self, status: str) -> int:
        """Requests in one status: "pending", "answered" or "failed"."""
        return self.con.execute("SELECT count(*) FROM requests WHERE status = ?", [status]).fetchone()[0]

    # -- LLM calls ---------------------------------------------------------------------------------
    def record_calls(self, calls: Sequence[CallRecord], failed: Sequence[str] = (),
                     ids: Sequence[int] | None = None) -> list[int]:
        """Append calls to the log and settle their requests, in one transaction: an "ok" call
        answers its request; the requests of `failed` keys are marked failed. Returns the calls' ids:
        `ids` if given (taken earlier with take_call_ids, or a journal's), else the next ones.

        A DuckDB statement costs ~0.5 ms however few rows it moves, so a batch is four: begin, one
        insert, one update, commit."""
        if not calls and not failed:
            return []
        # Given ids leave the count alone: the pool writer's thread commits while the event loop's
        # takes the next ids, and a journal's replay recounts after it.
        ids = list(ids) if ids is not None else self.take_call_ids(len(calls))
        if len(ids) != len(calls):
            raise ValueError(f"{len(calls)} calls, {len(ids)} ids")
        # Each request's settlement is one row of the same relation: "answered" with its call, or "failed".
        settle = {k: None for k in failed}
        settle.update({c.request_key: i for c, i in zip(calls, ids) if c.status == "ok"})
        rows = max(len(calls), len(settle))
        pad = lambda col: list(col) + [None] * (rows - len(col))  # noqa: E731
        columns = {name: pad(col) for name, col in zip(_CALL_COLUMNS, zip(*map(_call_values, calls)))} if calls else {}
        columns |= {"id": pad(ids), "settle_key": pad(settle), "settle_call": pad(settle.values())}
        with self._transaction(), self._relation(columns) as rel:
            if calls:
                names = ", ".join(["id", *_CALL_COLUMNS])
                self.con.execute(f"INSERT INTO llm_calls ({names}) SELECT {names} FROM {rel} WHERE id IS NOT NULL")
            if settle:
                self.con.execute(
                    f"UPDATE requests SET status = CASE WHEN b.settle_call IS NULL THEN 'failed' ELSE 'answered' END, "
                    f"answer_call = b.settle_call::BIGINT FROM {rel} b WHERE requests.key = b.settle_key")
        return ids

    def take_call_ids(self, n: int) -> list[int]:
        """The next n call ids. This connection is the pool's only writer (DuckDB locks the file), so
        ids are counted here rather than drawn from a sequence: one statement less per batch. Not
        thread-safe: the pool writer takes them on the event loop's thread, before it journals a call."""
        if self._next_call_id is None:
            self._next_call_id = self.con.execute("SELECT coalesce(max(id), 0) + 1 FROM llm_calls").fetchall()[0][0]
        first = self._next_call_id
        self._next_call_id += n
        return list(range(first, first + n))

    def recount_call_ids(self) -> None:
        """Count the next ids from the pool's calls again (after calls were added with their own ids)."""
        self._next_call_id = None

    def known_call_ids(self, ids: list[int]) -> set[int]:
        if not ids:
            return set()
        with self._relation({"id": ids}) as rel:
            found = self.con.execute(f"SELECT id FROM llm_calls WHERE id IN (SELECT id::BIGINT FROM {rel})").fetchall()
        return {i for (i,) in found}

    def has_paid_answers(self) -> bool:
        """Whether any call brought an answer: a failed first build keeps its file only then."""
        return self.con.execute("SELECT count(*) FROM llm_calls WHERE status = 'ok'").fetchone()[0] > 0

    def server_mode(self, base_url: str, model: str) -> str | None:
        row = self.con.execute("SELECT structured FROM server_caps WHERE base_url = ? AND model = ?",
                               [base_url, model]).fetchone()
        return row[0] if row else None

    def remember_server_mode(self, base_url: str, model: str, mode: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO server_caps VALUES (?, ?, ?)", [base_url, model, mode])

    def answered_calls(self) -> list[tuple]:
        """(call_id, source_kind, source_name, template, response) of every answered request."""
        return self.con.execute(
            "SELECT c.id, r.source_kind, r.source_name, r.template, c.response FROM requests r "
            "JOIN llm_calls c ON c.id = r.answer_call WHERE r.status = 'answered' ORDER BY c.id").fetchall()

    # -- derived tables ------------------------------------------------------------------------------
    def cached_phrase_vectors(self, embedder: str, texts: list[str]) -> dict[str, np.ndarray]:
        if not texts:
            return {}
        with self._relation({"text": texts}) as rel:
            found = self.con.execute(f"SELECT text, vec FROM phrase_vectors WHERE embedder = ? AND text IN "
                                     f"(SELECT text FROM {rel})", [embedder]).fetchnumpy()
        return dict(zip(found["text"].tolist(), found["vec"]))

    def store_phrase_vectors(self, embedder: str, texts: list[str], vectors: np.ndarray) -> None:
        import numpy as np

        if texts:
            with self._relation({"text": texts, "vec": list(np.asarray(vectors, dtype=np.float32))}) as rel:
                self.con.execute(f"INSERT OR IGNORE INTO phrase_vectors SELECT ?, text, vec FROM {rel}", [embedder])

    def replace_attributes(self, dim: int, attributes: list[tuple[int, str, str]], embeddings,
                           provenance: list[tuple], index_blob: bytes, index_desc: str, meta: dict[str, str]) -> None:
        """Swap in a new attribute set, its provenance and index in one transaction."""
        import numpy as np

        with self._transaction():
            self.con.execute("DROP TABLE IF EXISTS attributes")
            self.con.execute(f"CREATE TABLE attributes (id INTEGER PRIMARY KEY, kind VARCHAR, text VARCHAR, "
                             f"embedding FLOAT[{dim}])")
            if attributes:
                ids, kinds, texts = zip(*attributes)
                columns = {"id": ids, "kind": kinds, "text": texts,
                           "embedding": list(np.asarray(embeddings, dtype=np.float32))}
                with self._relation(columns) as rel:
                    self.con.execute(f"INSERT INTO attributes SELECT id, kind, text, embedding FROM {rel}")
            self.con.execute("DELETE FROM provenance")
            if provenance:
                names = ["attribute_id", "source_kind", "source_name", "template", "raw_phrase", "call_id"]
                if any(len(row) != len(names) for row in provenance):
                    raise ValueError(f"a provenance row has {len(names)} fields: {', '.join(names)}")
                with self._relation(dict(zip(names, zip(*provenance)))) as rel:
                    self.con.execute(f"INSERT INTO provenance SELECT {', '.join(names)} FROM {rel}")
            self.con.execute("INSERT OR REPLACE INTO faiss_index VALUES ('attributes', ?, ?, ?)",
                             [len(attributes), index_desc, index_blob])
            for k, v in meta.items():
                self.set_meta(k, v)

    def has_attributes(self) -> bool:
        return bool(self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'attributes'").fetchone()[0])

    def attribute_count(self) -> int:
        return self.con.execute("SELECT count(*) FROM attributes").fetchone()[0] if self.has_attributes() else 0

    def attribute_rows(self) -> list[tuple]:
        """(id, kind, text, embedding) of every canonical attribute, by id."""
        return self.con.execute("SELECT id, kind, text, embedding FROM attributes ORDER BY id").fetchall()

    def attribute_sources(self) -> list[tuple]:
        """(attribute_id, source_kind, source_name) once per pair, by attribute and source name."""
        return self.con.execute("SELECT DISTINCT attribute_id, source_kind, source_name FROM provenance "
                                "ORDER BY attribute_id, source_name").fetchall()

    def index_blob(self) -> bytes | None:
        """The serialised FAISS index of the attributes."""
        row = self.con.execute("SELECT blob FROM faiss_index WHERE name = 'attributes'").fetchone()
        return row[0] if row else None

    # -- reading ---------------------------------------------------------------------------------------
    def stats(self) -> dict:
        q = lambda sql: self.con.execute(sql).fetchone()[0]  # noqa: E731
        has_attrs = self.has_attributes()
        return {
            "classes": q("SELECT count(*) FROM sources WHERE kind = 'class'"),
            "domains": q("SELECT count(*) FROM sources WHERE kind = 'domain'"),
            "datasets": [d for (d,) in self.con.execute("SELECT DISTINCT dataset FROM sources ORDER BY 1").fetchall()],
            "attributes": q("SELECT count(*) FROM attributes") if has_attrs else 0,
            "class_attributes": q("SELECT count(*) FROM attributes WHERE kind = 'class'") if has_attrs else 0,
            "domain_attributes": q("SELECT count(*) FROM attributes WHERE kind = 'domain'") if has_attrs else 0,
            "raw_attributes": q("SELECT count(*) FROM provenance"),
            "llm_calls": q("SELECT count(*) FROM requests WHERE status = 'answered'"),
            "failed_calls": q("SELECT count(*) FROM requests WHERE status = 'failed'"),
            "pending_calls": q("SELECT count(*) FROM requests WHERE status = 'pending'"),
            "http_requests": q("SELECT count(*) FROM llm_calls"),
            "models": [m for (m,) in self.con.execute("SELECT DISTINCT model FROM requests ORDER BY 1").fetchall()],
            "backbone": self.meta("backbone"),
            "dim": int(self.meta("dim")) if self.meta("dim") else None,
            "index": self.con.execute("SELECT description FROM faiss_index WHERE name = 'attributes'").fetchone()[0]
            if q("SELECT count(*) FROM faiss_index") else None,
        }

    def attributes_by_source(self, kind: str | None = None, name: str | None = None) -> dict[str, list[str]]:
        """{source: [canonical attributes]} in source order; attributes in first-seen order."""
        sql = ("SELECT s.name, a.text FROM sources s JOIN provenance p ON p.source_kind = s.kind AND "
               "p.source_name = s.name JOIN attributes a ON a.id = p.attribute_id WHERE 1=1")
        args: list = []
        if kind:
            sql += " AND s.kind = ?"
            args.append(kind)
        if name:
            sql += " AND s.name = ?"
            args.append(name)
        sql += " GROUP BY s.kind, s.name, s.dataset, s.position, a.id, a.text ORDER BY s.kind, s.dataset, s.position, min(p.call_id), a.id"
        out: dict[str, list[str]] = {}
        for src, text in self.con.execute(sql, args).fetchall():
            out.setdefault(src, []).append(text)
        return out

    def source_names(self, kind: str) -> list[str]:
        return [n for (n,) in self.con.execute(
            "SELECT name FROM sources WHERE kind = ? ORDER BY dataset, position", [kind]).fetchall()]

    def sources_without_answer(self) -> list[str]:
        rows = self.con.execute(
            "SELECT source_name FROM requests GROUP BY source_kind, source_name "
            "HAVING count(*) FILTER (WHERE status = 'answered') = 0 ORDER BY 1").fetchall()
        return [n for (n,) in rows]

    def failed_by_source(self) -> dict[str, int]:
        rows = self.con.execute("SELECT source_name, count(*) FROM requests WHERE status = 'failed' "
                                "GROUP BY 1 ORDER BY 1").fetchall()
        return dict(rows)


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)
