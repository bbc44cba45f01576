"""Hash chains over tokens and events, and signed checkpoints of their heads (issue "Evidence that scales").

Rows recorded before this revision keep NULL chain columns: `stampd audit verify` counts them as unchained.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_TABLES = ("tokens", "events")
_COLUMNS = ("chain", "seq", "prev_hash", "entry_hash")


def _chain_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("chain", sa.String(64), comment="the chain id: one per process that opened the records"),
        sa.Column("seq", sa.BigInteger, comment="1, 2, 3... within the chain"),
        sa.Column("prev_hash", sa.LargeBinary, comment="entry_hash of seq - 1; 32 zero bytes for seq 1"),
        sa.Column("entry_hash", sa.LargeBinary, comment="SHA-256(prev_hash || the row's canonical fields)"),
    ]


def upgrade() -> None:
    for table in _TABLES:
        for column in _chain_columns():
            op.add_column(table, column)  # nullable: a plain ADD COLUMN, the SQLite trigger is kept
        op.create_index(f"uq_{table}_chain_seq", table, ["chain", "seq"], unique=True)
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at_us", sa.BigInteger, nullable=False),
        sa.Column("heads", sa.Text, nullable=False, comment="JSON: table -> chain -> [seq, entry_hash hex], as signed"),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("signer", sa.String(64), nullable=False, comment="hex SHA-256 of the signer's SubjectPublicKeyInfo"),
    )


def downgrade() -> None:
    op.drop_table("checkpoints")
    for table in _TABLES:
        op.drop_index(f"uq_{table}_chain_seq", table_name=table)
        for column in reversed(_COLUMNS):
            # Plain ALTER TABLE (SQLite >= 3.35 and PostgreSQL): a batch copy would drop the SQLite trigger.
            op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
