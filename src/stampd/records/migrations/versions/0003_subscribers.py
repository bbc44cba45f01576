"""Subscribers, their usage counters, and the subscriber of each token (issue 6: access control and quotas).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # nullable: a plain ADD COLUMN, so the SQLite trigger on tokens is kept; earlier tokens stay anonymous
    op.add_column(
        "tokens",
        sa.Column(
            "subscriber", sa.String(64), comment="the subscriber granted the token (revision 0003); NULL if anonymous"
        ),
    )
    op.create_index("ix_tokens_subscriber_gen_time_us", "tokens", ["subscriber", "gen_time_us"])
    op.create_table(
        "subscribers",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("networks", sa.Text, nullable=False, comment="JSON: the IP networks (CIDR) that identify it"),
        sa.Column("token_sha256", sa.LargeBinary, comment="SHA-256 of its API token; the token itself is never stored"),
        sa.Column("basic_user", sa.String(256)),
        sa.Column("basic_hash", sa.Text, comment="scrypt$n$r$p$salt$hash of its basic password"),
        sa.Column("cert_sha256", sa.Text, nullable=False, comment="JSON: hex SHA-256 of its client certificates"),
        sa.Column("quotas", sa.Text, nullable=False, comment='JSON: ["N/PERIOD", ...], at most one per period'),
        sa.Column("rate_per_s", sa.Integer),
        sa.Column("tsus", sa.Text, comment="JSON: the TSUs it may use; NULL for every TSU that serves subscribers"),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
    )
    op.create_index("uq_subscribers_token_sha256", "subscribers", ["token_sha256"], unique=True)
    op.create_index("uq_subscribers_basic_user", "subscribers", ["basic_user"], unique=True)
    op.create_table(
        "usage_counters",
        sa.Column("subscriber", sa.String(64), nullable=False),
        sa.Column(
            "window",
            sa.String(32),
            nullable=False,
            comment="day:2026-11-21, month:2026-11, total, s:<epoch second>...",
        ),
        sa.Column("count", sa.BigInteger, nullable=False, comment="tokens granted (or reserved) in the window"),
        sa.PrimaryKeyConstraint("subscriber", "window"),
    )


def downgrade() -> None:
    op.drop_table("usage_counters")
    op.drop_table("subscribers")
    op.drop_index("ix_tokens_subscriber_gen_time_us", table_name="tokens")
    # Plain ALTER TABLE (SQLite >= 3.35 and PostgreSQL): a batch copy would drop the SQLite trigger.
    op.execute("ALTER TABLE tokens DROP COLUMN subscriber")
