"""The initial records schema: tokens, tsu_states, events, and the trigger that refuses the records of a stopped
TSU's tokens (SPEC OPS-09, OPS-10, OPS-11).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_SQLITE_TRIGGER = """
CREATE TRIGGER tokens_refused_for_stopped_tsu BEFORE INSERT ON tokens
WHEN EXISTS (SELECT 1 FROM tsu_states WHERE tsu_states.tsu = NEW.tsu)
BEGIN SELECT RAISE(ABORT, 'the TSU is compromised or terminated'); END
"""

_POSTGRESQL_FUNCTION = """
CREATE FUNCTION tokens_refused_for_stopped_tsu() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM tsu_states WHERE tsu_states.tsu = NEW.tsu) THEN
        RAISE EXCEPTION 'the TSU is compromised or terminated' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$
"""

_POSTGRESQL_TRIGGER = """
CREATE TRIGGER tokens_refused_for_stopped_tsu BEFORE INSERT ON tokens
FOR EACH ROW EXECUTE FUNCTION tokens_refused_for_stopped_tsu()
"""


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("serial", sa.String(40), primary_key=True, comment="lowercase hexadecimal, no leading zeros"),
        sa.Column("gen_time", sa.String(32), nullable=False, comment="the token's GeneralizedTime, as encoded"),
        sa.Column("gen_time_us", sa.BigInteger, nullable=False, comment="genTime in microseconds since the epoch"),
        sa.Column("tsu", sa.String(64), nullable=False),
        sa.Column("policy", sa.String(256), nullable=False),
        sa.Column("hash_oid", sa.String(64), nullable=False),
        sa.Column("imprint", sa.LargeBinary, nullable=False),
        sa.Column("nonce", sa.Text, comment="decimal"),
        sa.Column("requester", sa.String(64)),
        sa.Column("token", sa.LargeBinary, nullable=False, comment="the DER TimeStampResp as returned"),
    )
    op.create_index("ix_tokens_imprint", "tokens", ["imprint"])
    op.create_index("ix_tokens_gen_time_us", "tokens", ["gen_time_us"])
    op.create_table(
        "tsu_states",
        sa.Column("tsu", sa.String(64), primary_key=True),
        sa.Column(
            "state",
            sa.String(16),
            nullable=False,
            comment="compromised or terminated; a TSU without a row is active",
        ),
        sa.Column("since_us", sa.BigInteger, comment="compromise: the earliest time the key may have been misused"),
        sa.Column("at_us", sa.BigInteger, nullable=False, comment="when the state was recorded"),
        sa.Column("reason", sa.Text),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at_us", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("tsu", sa.String(64)),
        sa.Column("detail", sa.Text, nullable=False, comment="JSON"),
    )
    # The database itself refuses the record of a token from a compromised or terminated TSU, so once the state
    # is committed no process or node can return another token from it, whatever it has cached.
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute(_SQLITE_TRIGGER)
    elif dialect == "postgresql":
        op.execute(_POSTGRESQL_FUNCTION)
        op.execute(_POSTGRESQL_TRIGGER)
    else:
        raise NotImplementedError(f"no stopped-TSU trigger for {dialect}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS tokens_refused_for_stopped_tsu ON tokens")
        op.execute("DROP FUNCTION IF EXISTS tokens_refused_for_stopped_tsu()")
    else:
        op.execute("DROP TRIGGER IF EXISTS tokens_refused_for_stopped_tsu")
    op.drop_table("events")
    op.drop_table("tsu_states")
    op.drop_index("ix_tokens_gen_time_us", table_name="tokens")
    op.drop_index("ix_tokens_imprint", table_name="tokens")
    op.drop_table("tokens")
