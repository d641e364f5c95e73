"""Requests are claimed by one Yanray process for a lease, so that several processes can
share one PostgreSQL database: who holds each request (`claimed_by`) and until when
(`lease_until`). Rows already stored are unclaimed (NULL): any process may take them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 06:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_requests_claimed_by", ["claimed_by", "delivered"])


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index("ix_requests_claimed_by")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("claimed_by")
