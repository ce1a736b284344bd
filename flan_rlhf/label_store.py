"""The label store: pairs of responses to judge and the judgements, in one SQL database (SQLAlchemy Core).

Two tables (and a ``meta`` row naming the schema):

* ``pairs`` - one row per pair to judge: the prompt, the two responses ``a`` and ``b`` with the
  policy and decoding that made each (``source_a``/``source_b``, JSON), which of them the page
  shows on the left (``shown_left``: drawn at random when the pair is added, so position carries
  no preference), and the lease: which labelling client holds the pair and until when.
* ``labels`` - one row per judgement: the pair, the choice as the labeller saw it (``left``,
  ``right``, ``tie``, ``both_unacceptable``), an optional note, the labeller, the client and the
  time. ``pair_id`` is unique: a pair is judged once (a replayed label is refused, not stored twice).

Every change is one transaction, committed before the call returns, so a killed server or a closed
tab loses no label that was acknowledged. Serving is a lease claimed by compare-and-set
(``UPDATE ... WHERE nobody holds it``), so two clients never hold the same pair at once on any
database; on SQLite every transaction also starts with ``BEGIN IMMEDIATE`` (one writer at a
time, the others wait up to ``busy_timeout``) in WAL mode with ``synchronous=FULL``, the
SQLAlchemy recipe for pysqlite transactions
(https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#serializable-isolation-savepoints-transactional-ddl).

Any SQLAlchemy URL works (``sqlite:///labels.db``, ``postgresql://user@host/labels``): a team
points several labellers at one server database.
"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import sqlalchemy as sa

SCHEMA = "flan-rlhf-labels 1"
#: the choices a labeller can make, as seen on the page
CHOICES = ("left", "right", "tie", "both_unacceptable")
#: how long a served pair stays with its client before another client may be given it
DEFAULT_LEASE_SECONDS = 600.0

metadata = sa.MetaData()
meta_table = sa.Table("meta", metadata, sa.Column("key", sa.String(64), primary_key=True),
                      sa.Column("value", sa.Text, nullable=False))
pairs_table = sa.Table(
    "pairs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("response_a", sa.Text, nullable=False),
    sa.Column("response_b", sa.Text, nullable=False),
    sa.Column("source_a", sa.Text, nullable=False),
    sa.Column("source_b", sa.Text, nullable=False),
    sa.Column("shown_left", sa.String(1), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("leased_by", sa.String(64), nullable=True),
    sa.Column("leased_until", sa.Float, nullable=True),
)
labels_table = sa.Table(
    "labels", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id"), nullable=False, unique=True),
    sa.Column("choice", sa.String(32), nullable=False),
    sa.Column("note", sa.Text, nullable=False, default=""),
    sa.Column("labeller", sa.String(128), nullable=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


class LabelStoreError(ValueError):
    """A store that cannot be opened or read (bad URL, no such file, not a label store); the message names the fix."""


class LabelRefused(ValueError):
    """A label or undo the store refuses, nothing written. ``status``: the HTTP status the page gets."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Pair:
    """One pair as the page shows it: ``left``/``right`` are the responses in the order drawn for it."""

    id: int
    prompt: str
    left: str
    right: str

    def as_json(self) -> dict[str, Any]:
        return {"pair_id": self.id, "prompt": self.prompt, "left": self.left, "right": self.right}


def parse_store_url(url: str) -> sa.URL:
    """``url`` parsed, or :class:`LabelStoreError` naming the fix (``labels.db`` -> ``sqlite:///labels.db``)."""
    if "://" not in url:
        raise LabelStoreError(f"label store {url!r} is not a database URL - pass sqlite:///{url} for a file")
    try:
        return sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise LabelStoreError(f"label store {url!r} is not a database URL - pass e.g. sqlite:///labels.db "
                              "(a file next to you) or postgresql://user@host/labels") from None


def sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite:///FILE`` URL (``None`` for an in-memory or non-SQLite database)."""
    parsed = parse_store_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


def _engine(url: str) -> sa.Engine:
    """An engine for ``url``; SQLite gets ``BEGIN IMMEDIATE`` transactions, WAL and a 30 s busy timeout."""
    parsed = parse_store_url(url)
    try:
        engine = sa.create_engine(parsed)
    except (ImportError, sa.exc.NoSuchModuleError) as err:
        raise LabelStoreError(f"label store {url!r}: no driver for {parsed.drivername} ({err}) - install it, "
                              "or use sqlite:///labels.db") from None
    if parsed.get_backend_name() == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record):  # pysqlite: we issue BEGIN ourselves (SQLAlchemy's recipe)
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout = 30000")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(connection):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    return engine


class LabelStore:
    """The pairs and labels of one database.

    Args:
        url: a SQLAlchemy database URL (``sqlite:///labels.db``).
        create: make the tables if the database has none (``flan-rlhf label``); ``False`` (a training
            run reading labels): the database must already be a label store.
        lease_seconds: how long a served pair stays with its client.
    """

    def __init__(self, url: str, create: bool = False, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.url = url
        self.lease_seconds = lease_seconds
        self.path = path = sqlite_path(url)  # None: not a SQLite file
        if path is not None and not create and not os.path.isfile(path):
            raise LabelStoreError(f"no label store at {path} ({url}) - label pairs first with "
                                  f"`flan-rlhf label --store {url} ...`, or fix the path")
        if path is not None and create and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise LabelStoreError(f"label store {url!r}: folder {os.path.dirname(os.path.abspath(path))} does not exist - "
                                  "create it or pick another path")
        self.engine = _engine(url)
        try:
            self._open(create)
        except sa.exc.DatabaseError as err:
            reason = str(err.orig or err).splitlines()[0]
            if path is None and isinstance(err, sa.exc.OperationalError):
                raise LabelStoreError(f"label store {url!r} cannot be reached ({reason}) - check that the database "
                                      "server runs and the URL's user, host, port and database name") from None
            raise LabelStoreError(f"label store {url!r} cannot be opened ({reason}) - "
                                  "pass a label store written by `flan-rlhf label`, or a new file") from None

    def _open(self, create: bool) -> None:
        with self.engine.begin() as conn:  # looked at and made in one transaction: two commands starting on
            tables = set(sa.inspect(conn).get_table_names())  # one new file make it once (BEGIN IMMEDIATE)
            made = not tables and create
            if made:
                metadata.create_all(conn)
                conn.execute(meta_table.insert().values(key="schema", value=SCHEMA))
        if made:
            self._use_write_ahead_log()
            return
        if "meta" not in tables:
            what = "an empty database" if not tables else f"a database of other tables ({', '.join(sorted(tables))})"
            raise LabelStoreError(f"label store {self.url!r} is {what}, not a label store - "
                                  "pass one written by `flan-rlhf label`" + ("" if tables else " (it makes one)"))
        with self.engine.connect() as conn:
            schema = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "schema")).scalar()
        if schema != SCHEMA:
            raise LabelStoreError(f"label store {self.url!r} has schema {schema!r}; this flan-rlhf reads {SCHEMA!r}")

    def _use_write_ahead_log(self) -> None:
        """A new SQLite store switches to WAL once (the mode is kept in the file): readers never wait for the
        writer. The switch needs the file to itself and SQLite's busy timeout does not cover it, so it is
        retried while another command opening the store holds it (up to 30 s)."""
        if self.path is None:
            return
        connection = self.engine.raw_connection()  # pysqlite in autocommit: the switch is refused in a transaction
        try:
            for attempt in range(300):
                try:
                    connection.cursor().execute("PRAGMA journal_mode = WAL")
                    return
                except sqlite3.OperationalError as err:
                    if "locked" not in str(err):
                        raise
                    time.sleep(0.1)
            raise LabelStoreError(f"label store {self.url!r} stayed locked by another process for 30 s - stop it "
                                  "or wait, then run the command again")
        finally:
            connection.close()

    def close(self) -> None:
        self.engine.dispose()

    # -- pairs -----------------------------------------------------------------------------
    def add_pairs(self, rows: Iterable[dict[str, Any]], seed: int = 0) -> int:
        """Add pairs (dicts with ``prompt``, ``response_a``, ``response_b``, ``source_a``, ``source_b``)
        in one transaction; which response is shown on the left is drawn from ``seed``. Returns the count."""
        draw = random.Random(seed)
        now = time.time()
        values = [{"prompt": row["prompt"], "response_a": row["response_a"], "response_b": row["response_b"],
                   "source_a": json.dumps(row["source_a"], sort_keys=True),
                   "source_b": json.dumps(row["source_b"], sort_keys=True),
                   "shown_left": draw.choice("ab"), "created_at": now} for row in rows]
        if values:
            with self.engine.begin() as conn:
                conn.execute(pairs_table.insert(), values)
        return len(values)

    def prompts_with_pairs(self, source_a: dict, source_b: dict) -> set[str]:
        """The prompts that already have a pair from these two sources (a restart samples only the others)."""
        query = sa.select(pairs_table.c.prompt).where(
            pairs_table.c.source_a == json.dumps(source_a, sort_keys=True),
            pairs_table.c.source_b == json.dumps(source_b, sort_keys=True))
        with self.engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def progress(self) -> dict[str, int]:
        """``{"labelled": judged pairs, "total": pairs}``."""
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(pairs_table)).scalar_one()
            labelled = conn.execute(sa.select(sa.func.count()).select_from(labels_table)).scalar_one()
        return {"labelled": int(labelled), "total": int(total)}

    def next_pair(self, client: str) -> Pair | None:
        """The pair ``client`` should judge next, leased to it; ``None`` when every pair is judged or held.

        A client that already holds an unjudged pair gets it again (a reloaded page shows the same
        pair); otherwise the first unjudged pair nobody holds is claimed by compare-and-set.
        """
        now = time.time()
        unjudged = ~sa.exists().where(labels_table.c.pair_id == pairs_table.c.id)
        free = sa.or_(pairs_table.c.leased_by.is_(None), pairs_table.c.leased_until < now)
        with self.engine.begin() as conn:
            own = conn.execute(sa.select(pairs_table.c.id).where(
                pairs_table.c.leased_by == client, unjudged).order_by(pairs_table.c.id).limit(1)).scalar()
            candidates = [own] if own is not None else conn.execute(
                sa.select(pairs_table.c.id).where(unjudged, free).order_by(pairs_table.c.id).limit(16)).scalars().all()
            for pair_id in candidates:
                condition = (pairs_table.c.leased_by == client) if pair_id == own else free
                claimed = conn.execute(pairs_table.update().where(pairs_table.c.id == pair_id, condition, unjudged)
                                       .values(leased_by=client, leased_until=now + self.lease_seconds))
                if claimed.rowcount == 1:
                    return self._pair(conn, pair_id)
        return None

    @staticmethod
    def _pair(conn, pair_id: int) -> Pair:
        row = conn.execute(sa.select(pairs_table).where(pairs_table.c.id == pair_id)).mappings().one()
        left, right = (row["response_a"], row["response_b"]) if row["shown_left"] == "a" else (
            row["response_b"], row["response_a"])
        return Pair(id=row["id"], prompt=row["prompt"], left=left, right=right)

    # -- labels ----------------------------------------------------------------------------
    def add_label(self, pair_id: int, client: str, choice: str, labeller: str, note: str = "") -> None:
        """Store one judgement of a pair ``client`` holds, in one transaction, and free the pair.

        Raises:
            LabelRefused: an unknown choice (422), an unknown pair (404), a pair already judged (409:
                a replayed label) or held by another client (409); nothing is written.
        """
        if choice not in CHOICES:
            raise LabelRefused(f"choice {choice!r} is not one of {', '.join(CHOICES)}", 422)
        with self.engine.begin() as conn:
            pair = conn.execute(sa.select(pairs_table.c.leased_by).where(pairs_table.c.id == pair_id)).first()
            if pair is None:
                raise LabelRefused(f"there is no pair {pair_id} in this store - fetch the next pair", 404)
            judged = conn.execute(sa.select(labels_table.c.id).where(labels_table.c.pair_id == pair_id)).first()
            if judged is not None:
                raise LabelRefused(f"pair {pair_id} is already labelled - a label is given once (undo it first)", 409)
            if pair.leased_by != client:
                raise LabelRefused(f"pair {pair_id} is not held by this page (another labeller has it, or its lease "
                                   "ran out) - fetch the next pair", 409)
            try:
                conn.execute(labels_table.insert().values(pair_id=pair_id, choice=choice, note=note, labeller=labeller,
                                                          client=client, created_at=time.time()))
            except sa.exc.IntegrityError:
                raise LabelRefused(f"pair {pair_id} is already labelled - a label is given once", 409) from None
            conn.execute(pairs_table.update().where(pairs_table.c.id == pair_id).values(leased_by=None, leased_until=None))

    def undo_last(self, client: str) -> int:
        """Delete ``client``'s latest label and give its pair back to ``client``; returns the pair id.

        Raises:
            LabelRefused: ``client`` has no label to undo (409).
        """
        with self.engine.begin() as conn:
            last = conn.execute(sa.select(labels_table.c.id, labels_table.c.pair_id).where(labels_table.c.client == client)
                                .order_by(labels_table.c.id.desc()).limit(1)).first()
            if last is None:
                raise LabelRefused("this page has no label to undo", 409)
            conn.execute(labels_table.delete().where(labels_table.c.id == last.id))
            conn.execute(pairs_table.update().where(pairs_table.c.id == last.pair_id)
                         .values(leased_by=client, leased_until=time.time() + self.lease_seconds))
        return int(last.pair_id)

    def judgements(self) -> list[dict[str, Any]]:
        """Every label with its pair, in labelling order: prompt, both responses and sources,
        ``shown_left``, choice, note, labeller, client, time, and ``chosen``/``rejected`` when one won."""
        query = (sa.select(pairs_table, labels_table.c.choice, labels_table.c.note, labels_table.c.labeller,
                           labels_table.c.client, labels_table.c.created_at.label("labelled_at"))
                 .join(labels_table, labels_table.c.pair_id == pairs_table.c.id).order_by(labels_table.c.id))
        with self.engine.connect() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        for row in rows:
            row["source_a"], row["source_b"] = json.loads(row["source_a"]), json.loads(row["source_b"])
            winner = winning_response(row["choice"], row["shown_left"])
            row["chosen"] = row[f"response_{winner}"] if winner else None
            row["rejected"] = row[f"response_{'b' if winner == 'a' else 'a'}"] if winner else None
            for key in ("leased_by", "leased_until"):
                row.pop(key)
        return rows


def winning_response(choice: str, shown_left: str) -> str | None:
    """``"a"`` or ``"b"``: the response a ``left``/``right`` choice preferred, given which was shown left;
    ``None`` for ``tie`` and ``both_unacceptable`` (no preference between the two)."""
    if choice == "left":
        return shown_left
    if choice == "right":
        return "b" if shown_left == "a" else "a"
    return None


def preference_pairs(judgements: Sequence[dict[str, Any]]) -> tuple[list[dict[str, str]], dict[str, int]]:
    """``(rows, skipped)``: ``{"prompt", "chosen", "rejected"}`` rows (TRL's columns) of the judgements
    that preferred one response, and how many of each other choice carried no preference."""
    rows, skipped = [], {"tie": 0, "both_unacceptable": 0}
    for judgement in judgements:
        if judgement["chosen"] is None:
            skipped[judgement["choice"]] += 1
        else:
            rows.append({"prompt": judgement["prompt"], "chosen": judgement["chosen"], "rejected": judgement["rejected"]})
    return rows, skipped


def without_preference(skipped: dict[str, int]) -> str:
    """How many labels carried no preference, as messages say it: ``"2 ties, 1 both unacceptable"``."""
    return f"{skipped['tie']} ties, {skipped['both_unacceptable']} both unacceptable"
