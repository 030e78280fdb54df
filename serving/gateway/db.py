"""The gateway's database (SQLAlchemy 2): API tokens (stored as SHA-256 digests), one usage row per request, and
conversations with their messages. A SQLite file by default (<cache>/gateway/gateway.db), any SQLAlchemy URL by
`serving.gateway.database_url` (postgresql+psycopg://... for a team). Every text written here went through the
same PII masker as data preparation (workspace/pii.py) first: the models' text columns mask every value assigned to
them (SQLAlchemy `validates`, so no code path can store one unmasked), masked before any cut to the column's bound,
and the JSON message lists are masked message by message before they are serialised. The callers run these methods
in a worker thread (run_in_threadpool), so masking never holds the event loop.

Tokens are 256-bit random strings, so a fast digest (SHA-256) is the right store: a slow password hash (bcrypt,
argon2) protects guessable human passwords and would only add latency to every request here.
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import os
import re
import secrets
from pathlib import Path
from typing import Iterable, Optional

from sqlalchemy import (Boolean, event, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, func, select,
                        update)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker, validates

from workspace.config.load import LoadedConfig
from workspace.paths import CACHE
from workspace.pii import mask_pii

ROLES = ("user", "admin")
TOKEN_PREFIX = "llmops-"
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class GatewayDbError(RuntimeError):
    pass


def parse_lifetime(text: str) -> dt.timedelta:
    """'30d', '12h', '45m' (days, hours, minutes) as a timedelta; a clear error otherwise."""
    m = re.fullmatch(r"\s*(\d{1,5})\s*([dhm])\s*", str(text))
    if not m or int(m.group(1)) == 0:
        raise GatewayDbError(f"token lifetime {text!r}: a positive number of days, hours or minutes, e.g. 30d, 12h, 45m")
    unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
    return dt.timedelta(**{unit: int(m.group(1))})


MIGRATIONS = Path(__file__).with_name("migrations")  # Alembic: env.py and versions/, no alembic.ini


def alembic_config(connection):
    """Alembic's configuration for the gateway's schema, on `connection` (migrations/env.py reads it from here)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine) -> tuple[Optional[str], str]:
    """Bring the database to this code's schema (Alembic's head) and return (revision before, head), keeping every
    row. A new database is created by the migrations; one made before the schema was under migrations (tables, no
    alembic_version) gets what earlier releases added at start (missing tables, api_tokens.expires_at) and is stamped
    at head; one at a revision this code does not know (made by newer code) is refused, naming both revisions."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect, text

    with engine.begin() as conn:
        cfg = alembic_config(conn)
        script = ScriptDirectory.from_config(cfg)
        head = script.get_current_head()
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and current not in {s.revision for s in script.walk_revisions()}:
            raise GatewayDbError(f"the gateway database is at schema revision {current}, which this code does not know "
                                 f"(its newest is {head}): it was migrated by newer code. Run that code, or point "
                                 "serving.gateway.database_url at another database")
        if current is None and "api_tokens" in inspect(conn).get_table_names():
            Base.metadata.create_all(conn)  # what the releases before migrations did at start
            if "expires_at" not in {c["name"] for c in inspect(conn).get_columns("api_tokens")}:
                conn.execute(text("ALTER TABLE api_tokens ADD COLUMN expires_at TIMESTAMP"))
            command.stamp(cfg, head)
        elif current != head:
            command.upgrade(cfg, "head")
    return current, head


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _sqlite_pragmas(conn, _record) -> None:
    # WAL: readers (usage export) never block the writer; synchronous=NORMAL: a commit is not an fsync (a power cut
    # can lose the last rows, never corrupt the file), which keeps the per-request usage row off the critical path
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class Base(DeclarativeBase):
    pass


def masked(value, limit: Optional[int] = None) -> Optional[str]:
    """A value as stored: PII-masked first, then cut to `limit` characters (a number cut in half is not masked)."""
    if value is None:
        return None
    text = mask_pii(value if isinstance(value, str) else str(value))
    return text[:limit] if limit else text


def masked_messages(messages: list[dict]) -> str:
    """A message list as stored: JSON, every message's text masked before serialisation (inside JSON a newline is
    `\\n`, which would glue the next number to a letter)."""
    return json.dumps([{**m, "content": masked(m.get("content"))} for m in messages], ensure_ascii=False)


TITLE_CHARS = 80  # a conversation's title: the first characters of its masked first message
ERROR_CHARS = 1000


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(10))
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)  # None: never


class Usage(Base):
    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now, index=True)
    token_name: Mapped[Optional[str]] = mapped_column(String(100), index=True)
    requested_model: Mapped[Optional[str]] = mapped_column(String(200))
    alias: Mapped[Optional[str]] = mapped_column(String(200))  # the alias that answered (after canary / routes)
    version: Mapped[Optional[str]] = mapped_column(String(50))  # the registry version it resolved to
    upstream_model: Mapped[Optional[str]] = mapped_column(String(200))
    replica: Mapped[Optional[str]] = mapped_column(String(300))
    canary: Mapped[bool] = mapped_column(Boolean, default=False)
    route: Mapped[Optional[str]] = mapped_column(String(100))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    input_tokens: Mapped[Optional[int]] = mapped_column(Integer)
    output_tokens: Mapped[Optional[int]] = mapped_column(Integer)
    ttft_ms: Mapped[Optional[float]] = mapped_column(Float)
    latency_ms: Mapped[Optional[float]] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    error: Mapped[Optional[str]] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    prompt: Mapped[Optional[str]] = mapped_column(Text)  # PII-masked
    answer: Mapped[Optional[str]] = mapped_column(Text)  # PII-masked

    @validates("requested_model", "error", "prompt", "answer")
    def _mask(self, key: str, value):
        return masked(value, {"requested_model": 200, "error": ERROR_CHARS}.get(key))


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_name: Mapped[str] = mapped_column(String(100), index=True)
    title: Mapped[str] = mapped_column(String(200))
    model: Mapped[Optional[str]] = mapped_column(String(200))
    system_prompt: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)

    @validates("title", "model", "system_prompt")
    def _mask(self, key: str, value):
        return masked(value, {"title": TITLE_CHARS, "model": 200}.get(key))


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(20))
    content: Mapped[str] = mapped_column(Text)  # PII-masked
    request_id: Mapped[Optional[str]] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)

    @validates("content")
    def _mask(self, key: str, value):
        return masked(value)


class Exchange(Base):
    """A chat request's input messages (PII-masked JSON), kept when `log_text` so feedback on its answer can be
    harvested as a training row with its whole context."""
    __tablename__ = "exchanges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    token_name: Mapped[str] = mapped_column(String(100), index=True)
    messages: Mapped[str] = mapped_column(Text)  # JSON, PII-masked
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class Feedback(Base):
    """A rating (+1 up, -1 down) and/or a corrected answer on one answered request; one per request (the last
    word counts). The answering alias and registry version are copied from the usage row."""
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    token_name: Mapped[str] = mapped_column(String(100), index=True)
    alias: Mapped[Optional[str]] = mapped_column(String(200))
    version: Mapped[Optional[str]] = mapped_column(String(50), index=True)
    rating: Mapped[Optional[int]] = mapped_column(Integer)
    correction: Mapped[Optional[str]] = mapped_column(Text)  # PII-masked
    comment: Mapped[Optional[str]] = mapped_column(Text)  # PII-masked

    @validates("correction", "comment")
    def _mask(self, key: str, value):
        return masked(value)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class ArenaMatch(Base):
    """One prompt answered by two models, shown blind as A and B (the order drawn at random); `winner` is A, B or
    tie once the person voted."""
    __tablename__ = "arena"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_name: Mapped[str] = mapped_column(String(100), index=True)
    messages: Mapped[str] = mapped_column(Text)  # JSON, PII-masked
    model_a: Mapped[str] = mapped_column(String(200))
    version_a: Mapped[str] = mapped_column(String(50), index=True)
    answer_a: Mapped[str] = mapped_column(Text)  # PII-masked
    request_a: Mapped[str] = mapped_column(String(64))
    model_b: Mapped[str] = mapped_column(String(200))
    version_b: Mapped[str] = mapped_column(String(50), index=True)
    answer_b: Mapped[str] = mapped_column(Text)  # PII-masked
    request_b: Mapped[str] = mapped_column(String(64))
    winner: Mapped[Optional[str]] = mapped_column(String(4))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now, index=True)
    voted_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, index=True)

    @validates("answer_a", "answer_b")
    def _mask(self, key: str, value):
        return masked(value)


WINNERS = ("A", "B", "tie")
USAGE_COLUMNS = [c.name for c in Usage.__table__.columns]


def _private_file(path: Path) -> None:
    """The SQLite file readable by its owner only (0600): it holds token digests, prompts and answers. SQLite gives
    its -wal and -shm files the database file's permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    elif path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
        path.chmod(0o600)


def _valid_id(value) -> bool:
    """A row id the database can hold (SQLite and PostgreSQL integers are 64-bit: 10**23 would be an OverflowError)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2 ** 63


def _cell(value):
    """A CSV cell a spreadsheet opens as text: one that begins with = + - @ (a formula) or a tab/CR gets a leading
    apostrophe (OWASP's advice for CSV injection); numbers stay numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _row(obj) -> dict:
    return {c.name: (v.isoformat() if isinstance(v := getattr(obj, c.name), dt.datetime) else v)
            for c in obj.__table__.columns}


def database_url(loaded: LoadedConfig) -> str:
    url = loaded.config.serving.gateway.database_url
    if url:
        return url
    path = CACHE / "gateway" / "gateway.db"
    return f"sqlite:///{path}"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class GatewayDb:
    """The gateway's tables on one SQLAlchemy engine (created if missing)."""

    def __init__(self, url: str):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            _private_file(Path(url[len("sqlite:///"):]))
        try:
            self.engine: Engine = create_engine(url, future=True, pool_pre_ping=True)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            self.revision_before, self.revision = migrate(self.engine)
        except GatewayDbError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad URL, an unreachable server, a missing driver: one named error
            raise GatewayDbError(f"the gateway database {self._safe(url)} cannot be opened ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200]}); check serving.gateway.database_url") from exc
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self.url = url

    @staticmethod
    def _safe(url: str) -> str:
        from sqlalchemy.engine import make_url

        try:
            return make_url(url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001
            return "(unparsable URL)"

    # --- tokens ---
    def create_token(self, name: str, role: str, expires_in: Optional[dt.timedelta] = None) -> str:
        """A new random token for `name` (printed once by the caller; only its digest is stored), valid for
        `expires_in` when given (else until revoked)."""
        if expires_in is not None and expires_in <= dt.timedelta(0):
            raise GatewayDbError(f"a token's lifetime must be positive, got {expires_in}")
        if role not in ROLES:
            raise GatewayDbError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
            raise GatewayDbError(f"token name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                                 "digit, e.g. `make token NAME=alice ROLE=user`")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.session() as s, s.begin():
            old = s.scalar(select(ApiToken).where(ApiToken.name == name))
            if old is not None and not old.revoked:
                raise GatewayDbError(f"a token named {name!r} exists already: revoke it first or pick another NAME")
            if old is not None:  # revoked: its row keeps its history under another name, the name is free again
                old.name = f"{name}~revoked-{old.id}"
                s.flush()
            s.add(ApiToken(name=name, role=role, digest=digest(token),
                           expires_at=_now() + expires_in if expires_in is not None else None))
        return token

    def check_token(self, token: str) -> Optional[ApiToken]:
        with self.session() as s:
            return s.scalar(select(ApiToken).where(ApiToken.digest == digest(token), ApiToken.revoked.is_(False),
                                                   (ApiToken.expires_at.is_(None)) | (ApiToken.expires_at > _now())))

    def revoke_token(self, name: str) -> bool:
        with self.session() as s, s.begin():
            return s.execute(update(ApiToken).where(ApiToken.name == name).values(revoked=True)).rowcount > 0

    def tokens(self) -> list[dict]:
        with self.session() as s:
            return [{"name": t.name, "role": t.role, "created_at": t.created_at.isoformat(), "revoked": t.revoked,
                     "expires_at": t.expires_at.isoformat() if t.expires_at else None}
                    for t in s.scalars(select(ApiToken).order_by(ApiToken.id))]

    # --- usage ---
    def add_usage(self, **row) -> None:
        with self.session() as s, s.begin():
            s.add(Usage(**row))

    def usage(self, since: Optional[dt.datetime] = None, token_name: Optional[str] = None,
              limit: int = 10_000) -> list[dict]:
        q = select(Usage).order_by(Usage.id)
        if since is not None:
            q = q.where(Usage.created_at >= since)
        if token_name:
            q = q.where(Usage.token_name == token_name)
        with self.session() as s:
            return [{c: (v.isoformat() if isinstance(v := getattr(u, c), dt.datetime) else v) for c in USAGE_COLUMNS}
                    for u in s.scalars(q.limit(limit))]

    def usage_csv(self, rows: Iterable[dict]) -> str:
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=USAGE_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})
        return out.getvalue()

    def usage_summary(self) -> list[dict]:
        with self.session() as s:
            q = select(Usage.token_name, Usage.alias, func.count(), func.sum(Usage.input_tokens),
                       func.sum(Usage.output_tokens)).group_by(Usage.token_name, Usage.alias)
            return [{"token_name": t, "alias": a, "requests": n, "input_tokens": i or 0, "output_tokens": o or 0}
                    for t, a, n, i, o in s.execute(q)]

    # --- conversations ---
    def create_conversation(self, token_name: str, title: str, model: Optional[str] = None,
                            system_prompt: Optional[str] = None) -> dict:
        with self.session() as s, s.begin():
            c = Conversation(token_name=token_name, title=title or "new conversation", model=model,
                             system_prompt=system_prompt)
            s.add(c)
            s.flush()
            return self._conv(c)

    @staticmethod
    def _conv(c: Conversation) -> dict:
        return {"id": c.id, "title": c.title, "model": c.model, "system_prompt": c.system_prompt,
                "created_at": c.created_at.isoformat(), "updated_at": c.updated_at.isoformat()}

    def conversations(self, token_name: str) -> list[dict]:
        with self.session() as s:
            q = select(Conversation).where(Conversation.token_name == token_name).order_by(Conversation.updated_at.desc(),
                                                                                           Conversation.id.desc())
            return [self._conv(c) for c in s.scalars(q)]

    def conversation(self, token_name: str, conv_id: int) -> Optional[dict]:
        if not _valid_id(conv_id):
            return None
        with self.session() as s:
            c = s.get(Conversation, conv_id)
            if c is None or c.token_name != token_name:  # another token's conversation is not found, not forbidden
                return None
            msgs = s.scalars(select(Message).where(Message.conversation_id == conv_id).order_by(Message.id))
            return {**self._conv(c), "messages": [{"role": m.role, "content": m.content, "request_id": m.request_id}
                                                  for m in msgs]}

    def update_conversation(self, token_name: str, conv_id: int, **fields) -> Optional[dict]:
        if not _valid_id(conv_id):
            return None
        with self.session() as s, s.begin():
            c = s.get(Conversation, conv_id)
            if c is None or c.token_name != token_name:
                return None
            for k, v in fields.items():
                if v is not None:
                    setattr(c, k, v)
            c.updated_at = _now()
            return self._conv(c)

    def add_messages(self, conv_id: int, messages: list[dict], request_id: str, **fields) -> None:
        with self.session() as s, s.begin():
            c = s.get(Conversation, conv_id)
            if c is None:
                return
            for m in messages:
                s.add(Message(conversation_id=conv_id, role=m["role"], content=m["content"], request_id=request_id))
            for k, v in fields.items():
                if v is not None:
                    setattr(c, k, v)
            c.updated_at = _now()

    # --- exchanges, feedback, arena ---
    def add_exchange(self, request_id: str, token_name: str, messages: list[dict]) -> None:
        with self.session() as s, s.begin():
            s.add(Exchange(request_id=request_id, token_name=token_name, messages=masked_messages(messages)))

    def answered(self, token_name: str, request_id: str) -> Optional[dict]:
        """The usage row of a request this token made and got an answer to (status 200), or None."""
        with self.session() as s:
            u = s.scalar(select(Usage).where(Usage.request_id == request_id, Usage.token_name == token_name,
                                             Usage.status == 200))
            return _row(u) if u is not None else None

    def set_feedback(self, token_name: str, request_id: str, *, alias: Optional[str], version: Optional[str],
                     rating: Optional[int], correction: Optional[str], comment: Optional[str]) -> dict:
        with self.session() as s, s.begin():
            f = s.scalar(select(Feedback).where(Feedback.request_id == request_id))
            if f is None:
                f = Feedback(request_id=request_id, token_name=token_name, alias=alias, version=version)
                s.add(f)
            f.rating, f.correction, f.comment, f.updated_at = rating, correction, comment, _now()
            s.flush()
            return _row(f)

    def feedback(self, since: Optional[dt.datetime] = None) -> list[dict]:
        """Feedback rows joined with the request's prompt messages and answer (both PII-masked)."""
        q = (select(Feedback, Exchange.messages, Usage.answer)
             .join(Exchange, Exchange.request_id == Feedback.request_id, isouter=True)
             .join(Usage, Usage.request_id == Feedback.request_id, isouter=True).order_by(Feedback.id))
        if since is not None:
            q = q.where(Feedback.updated_at >= since)
        with self.session() as s:
            return [{**_row(f), "messages": json.loads(m) if m else None, "answer": a} for f, m, a in s.execute(q)]

    def create_match(self, token_name: str, messages: list[dict], a: dict, b: dict) -> dict:
        with self.session() as s, s.begin():
            m = ArenaMatch(token_name=token_name, messages=masked_messages(messages),
                           model_a=a["model"], version_a=a["version"], answer_a=a["answer"], request_a=a["request_id"],
                           model_b=b["model"], version_b=b["version"], answer_b=b["answer"], request_b=b["request_id"])
            s.add(m)
            s.flush()
            return _row(m)

    def pair_votes(self, token_name: str, version_1: str, version_2: str, session=None) -> int:
        """How many votes `token_name` cast on matches between these two versions (in either order)."""
        q = select(func.count()).select_from(ArenaMatch).where(
            ArenaMatch.token_name == token_name, ArenaMatch.winner.is_not(None),
            ((ArenaMatch.version_a == version_1) & (ArenaMatch.version_b == version_2))
            | ((ArenaMatch.version_a == version_2) & (ArenaMatch.version_b == version_1)))
        if session is not None:
            return session.scalar(q)
        with self.session() as s:
            return s.scalar(q)

    def vote(self, token_name: str, match_id: int, winner: str, per_pair: Optional[int] = None) -> Optional[dict]:
        """Record the vote; None when the match is not this token's; GatewayDbError when it was voted on already, or
        when the token has cast `per_pair` votes on this pair of versions."""
        if winner not in WINNERS:
            raise GatewayDbError(f"winner {winner!r} is not one of {', '.join(WINNERS)}")
        if not _valid_id(match_id):
            return None
        with self.session() as s, s.begin():
            m = s.get(ArenaMatch, match_id)
            if m is None or m.token_name != token_name:
                return None
            if m.winner is not None:
                raise GatewayDbError(f"arena match {match_id} already has a vote ({m.winner}); one vote per match")
            if per_pair is not None and self.pair_votes(token_name, m.version_a, m.version_b, s) >= per_pair:
                raise GatewayDbError(f"token {token_name!r} already voted on v{m.version_a} vs v{m.version_b} ({per_pair} "
                                     "vote(s) per token per pair: serving.gateway.arena.votes_per_pair)")
            m.winner, m.voted_at = winner, _now()
            return _row(m)

    def matches(self, since: Optional[dt.datetime] = None, voted: bool = True) -> list[dict]:
        q = select(ArenaMatch).order_by(ArenaMatch.id)
        if voted:
            q = q.where(ArenaMatch.winner.is_not(None))
        if since is not None:
            q = q.where(ArenaMatch.created_at >= since)
        with self.session() as s:
            return [{**_row(m), "messages": json.loads(m.messages)} for m in s.scalars(q)]

    def arena_tally(self, version: str, reference: str) -> dict:
        """Votes between two registry versions, from `version`'s side: wins, losses, ties (either display order)."""
        out = {"wins": 0, "losses": 0, "ties": 0}
        pair = {version, reference}
        with self.session() as s:
            q = select(ArenaMatch).where(ArenaMatch.winner.is_not(None), ArenaMatch.version_a.in_(pair),
                                         ArenaMatch.version_b.in_(pair), ArenaMatch.version_a != ArenaMatch.version_b)
            for m in s.scalars(q):
                if m.winner == "tie":
                    out["ties"] += 1
                else:
                    won = m.version_a if m.winner == "A" else m.version_b
                    out["wins" if won == version else "losses"] += 1
        return out

    def arena_summary(self) -> list[dict]:
        """Per version: matches voted, wins, losses, ties and win rate (ties count half), across all opponents."""
        stats: dict[str, dict] = {}
        with self.session() as s:
            for m in s.scalars(select(ArenaMatch).where(ArenaMatch.winner.is_not(None))):
                for side, v in (("A", m.version_a), ("B", m.version_b)):
                    st = stats.setdefault(v, {"version": v, "votes": 0, "wins": 0, "losses": 0, "ties": 0})
                    st["votes"] += 1
                    st["ties" if m.winner == "tie" else "wins" if m.winner == side else "losses"] += 1
        for st in stats.values():
            st["win_rate"] = round((st["wins"] + 0.5 * st["ties"]) / st["votes"], 4)
        return sorted(stats.values(), key=lambda st: -st["win_rate"])

    def version_usage(self, version: str) -> dict:
        """What the gateway saw of one registry version: requests, errors, median latency, ratings, corrections."""
        with self.session() as s:
            rows = s.execute(select(Usage.status, Usage.latency_ms).where(Usage.version == str(version))).all()
            fb = s.execute(select(Feedback.rating, Feedback.correction).where(Feedback.version == str(version))).all()
        lat = sorted(r[1] for r in rows if r[0] == 200 and r[1] is not None)
        return {"requests": len(rows), "errors": sum(1 for r in rows if r[0] != 200),
                "latency_p50_ms": lat[len(lat) // 2] if lat else None,
                "up": sum(1 for r in fb if r[0] == 1), "down": sum(1 for r in fb if r[0] == -1),
                "corrected": sum(1 for r in fb if r[1])}
