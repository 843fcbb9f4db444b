"""The pool file: one DuckDB database holding names, every LLM call, attributes, provenance and the
serialised FAISS index.

The call log is written as answers arrive (each insert commits), so a crash loses no paid answer;
the derived tables (attributes, provenance, index) are replaced in one transaction, so a reader
never sees half of them. A pool that has never been completed lives at `<pool>.partial` and is
renamed into place when its first build finishes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import duckdb

from ..errors import UserError

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


class PoolStore:
    """A pool's connection and every query on it. Closes on leaving a `with` block."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, read_only: bool):
        self.con = con
        self.path = path
        self.read_only = read_only
        self._closed = False

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
        return store

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

    # -- sources and requests ----------------------------------------------------------------------
    def add_sources(self, dataset: str, kind: str, names: tuple[str, ...]) -> None:
        rows = [(kind, n, dataset, i) for i, n in enumerate(names)]
        if rows:
            self.con.executemany("INSERT OR IGNORE INTO sources VALUES (?, ?, ?, ?)", rows)

    def add_requests(self, rows: list[tuple]) -> None:
        """rows: (key, source_kind, source_name, template, form, model, n, payload_json)."""
        if rows:
            self.con.executemany(
                "INSERT OR IGNORE INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', NULL)", rows)

    def answered_keys(self, keys: list[str]) -> set[str]:
        if not keys:
            return set()
        found = self.con.execute(
            "SELECT key FROM requests WHERE status = 'answered' AND key IN (SELECT unnest(?))", [keys]).fetchall()
        return {k for (k,) in found}

    def request_rows(self, keys: list[str]) -> dict[str, tuple]:
        rows = self.con.execute(
            "SELECT key, source_kind, source_name, template, form, model, n, payload FROM requests "
            "WHERE key IN (SELECT unnest(?))", [keys]).fetchall()
        return {r[0]: r for r in rows}

    def count_requests(self, status: str) -> int:
        """Requests in one status: "pending", "answered" or "failed"."""
        return self.con.execute("SELECT count(*) FROM requests WHERE status = ?", [status]).fetchone()[0]

    def set_request_status(self, key: str, status: str, call_id: int | None = None) -> None:
        self.con.execute("UPDATE requests SET status = ?, answer_call = ? WHERE key = ?", [status, call_id, key])

    # -- LLM calls ---------------------------------------------------------------------------------
    def record_call(self, rec: CallRecord) -> int:
        (call_id,) = self.con.execute("SELECT nextval('call_ids')").fetchone()
        self.con.execute(
            "INSERT INTO llm_calls (id, request_key, backend, base_url, model, template, form, prompt_hash, "
            "structured, attempt, status, error, response, latency_s, prompt_tokens, completion_tokens) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [call_id, rec.request_key, rec.backend, rec.base_url, rec.model, rec.template, rec.form,
             rec.prompt_hash, rec.structured, rec.attempt, rec.status, rec.error, rec.response,
             rec.latency_s, rec.prompt_tokens, rec.completion_tokens])
        return call_id

    def answer_and_record(self, rec: CallRecord) -> int:
        """Record a usable answer and mark its request answered, atomically."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            call_id = self.record_call(rec)
            self.set_request_status(rec.request_key, "answered", call_id)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        return call_id

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
    def cached_phrase_vectors(self, embedder: str, texts: list[str]) -> dict[str, list[float]]:
        if not texts:
            return {}
        rows = self.con.execute("SELECT text, vec FROM phrase_vectors WHERE embedder = ? AND text IN "
                                "(SELECT unnest(?))", [embedder, texts]).fetchall()
        return dict(rows)

    def store_phrase_vectors(self, embedder: str, texts: list[str], vectors) -> None:
        if texts:
            self.con.execute("INSERT OR IGNORE INTO phrase_vectors SELECT ?, unnest(?), unnest(?)",
                             [embedder, texts, [v.tolist() for v in vectors]])

    def replace_attributes(self, dim: int, attributes: list[tuple[int, str, str]], embeddings,
                           provenance: list[tuple], index_blob: bytes, index_desc: str, meta: dict[str, str]) -> None:
        """Swap in a new attribute set, its provenance and index in one transaction."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.execute("DROP TABLE IF EXISTS attributes")
            self.con.execute(f"CREATE TABLE attributes (id INTEGER PRIMARY KEY, kind VARCHAR, text VARCHAR, "
                             f"embedding FLOAT[{dim}])")
            if attributes:
                ids, kinds, texts = (list(c) for c in zip(*attributes))
                self.con.execute("INSERT INTO attributes SELECT unnest(?), unnest(?), unnest(?), unnest(?)",
                                 [ids, kinds, texts, embeddings.tolist()])
            self.con.execute("DELETE FROM provenance")
            if provenance:
                self.con.executemany("INSERT INTO provenance VALUES (?, ?, ?, ?, ?, ?)", provenance)
            self.con.execute("INSERT OR REPLACE INTO faiss_index VALUES ('attributes', ?, ?, ?)",
                             [len(attributes), index_desc, index_blob])
            for k, v in meta.items():
                self.set_meta(k, v)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

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
