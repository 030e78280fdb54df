"""The gateway's schema under Alembic (serving/gateway/migrations/, run by GatewayDb at start, so `make gateway`
upgrades before it serves): a database filled by the releases before migrations keeps every row and every token;
each migration upgrades with data in it and downgrades cleanly; a database migrated by newer code is refused,
naming both revisions; and the migrations build exactly the tables the models describe (no drift). Each test runs
on SQLite and on a throwaway PostgreSQL server (tests/conftest.py: `database_url`)."""
from __future__ import annotations

import datetime as dt

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from serving.gateway.db import Base, GatewayDb, GatewayDbError, alembic_config


def fill(db: GatewayDb) -> dict:
    """One of everything the gateway stores: two tokens (one expiring), usage, a conversation with messages, an
    exchange with feedback, an arena match with its vote."""
    alice, bob = db.create_token("alice", "user"), db.create_token("bob", "admin", dt.timedelta(days=30))
    db.add_usage(request_id="r1", token_name="alice", requested_model="champion", alias="champion", version="2",
                 status=200, input_tokens=3, output_tokens=5, prompt="연락처 010-1234-5678", answer="<Screen/>")
    conv = db.create_conversation("alice", "회원 목록", "champion", None)
    db.add_messages(conv["id"], [{"role": "user", "content": "회원 목록"}, {"role": "assistant", "content": "<Screen/>"}], "r1")
    db.add_exchange("r1", "alice", [{"role": "user", "content": "회원 목록"}])
    db.set_feedback("alice", "r1", alias="champion", version="2", rating=1, correction=None, comment="good")
    match = db.create_match("alice", [{"role": "user", "content": "주문 화면"}],
                            {"model": "champion", "version": "2", "answer": "a", "request_id": "ra"},
                            {"model": "candidate", "version": "3", "answer": "b", "request_id": "rb"})
    db.vote("alice", match["id"], "A")
    return {"alice": alice, "bob": bob, "conversation": conv["id"]}


def check(db: GatewayDb, made: dict) -> None:
    assert db.check_token(made["alice"]).name == "alice" and db.check_token(made["bob"]).role == "admin"
    assert [u["request_id"] for u in db.usage()] == ["r1"] and db.usage()[0]["prompt"] == "연락처 <PHONE>"
    conv = db.conversation("alice", made["conversation"])
    assert conv is not None and [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert [f["comment"] for f in db.feedback()] == ["good"]
    assert db.arena_tally("2", "3") == {"wins": 1, "losses": 0, "ties": 0} and db.pair_votes("alice", "2", "3") == 1


def _release_database(url: str, with_expiry: bool) -> None:
    """The tables as the releases before migrations left them: no alembic_version; the oldest without expires_at."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        if not with_expiry:
            from alembic.operations import Operations

            with Operations(MigrationContext.configure(conn, opts={"render_as_batch": True})).batch_alter_table("api_tokens") as b:
                b.drop_column("expires_at")
    engine.dispose()


@pytest.mark.parametrize("with_expiry", [True, False], ids=["current-release", "before-token-expiry"])
def test_a_database_from_before_migrations_keeps_every_row(database_url, with_expiry):
    made = fill(GatewayDb(database_url))
    _release_database(database_url, with_expiry)
    assert "alembic_version" not in inspect(create_engine(database_url)).get_table_names()
    db = GatewayDb(database_url)  # what make gateway does at start
    assert (db.revision_before, db.revision) == (None, "0002")
    check(db, made)
    assert db.check_token(made["bob"]).expires_at is not None or not with_expiry


def test_each_migration_upgrades_with_data_and_downgrades_cleanly(database_url):
    engine = create_engine(database_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    with engine.begin() as conn:  # a token of the 0001 schema (no expiry column), as that release wrote it
        conn.execute(text("INSERT INTO api_tokens (name, role, digest, created_at, revoked) "
                          "VALUES ('carol', 'user', :d, :t, :f)"),
                     {"d": "0" * 64, "t": dt.datetime(2026, 11, 1), "f": False})
    db = GatewayDb(database_url)
    assert (db.revision_before, db.revision) == ("0001", "0002")
    assert [t["name"] for t in db.tokens()] == ["carol"]
    made = fill(db)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0001")
        assert "expires_at" not in {c["name"] for c in inspect(conn).get_columns("api_tokens")}
        assert conn.execute(text("SELECT count(*) FROM api_tokens")).scalar() == 3  # no row lost on the way down
        command.downgrade(alembic_config(conn), "base")
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    db = GatewayDb(database_url)
    assert db.revision_before is None and db.tokens() == [] and made  # built again from nothing
    engine.dispose()


def test_a_database_migrated_by_newer_code_is_refused_naming_both_revisions(database_url):
    GatewayDb(database_url)
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dcafe'"))
    engine.dispose()
    with pytest.raises(GatewayDbError, match=r"revision f00dcafe.*newest is 0002"):
        GatewayDb(database_url)


def test_the_migrations_build_exactly_the_models_tables(database_url):
    GatewayDb(database_url)
    engine = create_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"the models and the migrations differ (add a migration under serving/gateway/migrations): {diff}"
