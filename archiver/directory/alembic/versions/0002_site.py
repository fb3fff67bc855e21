"""A site of several Archivers: which Archiver records each camera, the Archiver registry, and
the site's audit log (each Archiver's audit.jsonl lines, with their hashes).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Ms = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # NULL for every existing camera: the Archiver that added it (the only one until now).
    op.add_column("cameras", sa.Column("archiver", sa.Text))
    op.create_table(
        "archivers",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("certificate", sa.LargeBinary, nullable=False),
        sa.Column("registered_ms", Ms, nullable=False),
        sa.Column("heartbeat_ms", Ms),
    )
    op.create_table(
        "camera_placements",
        sa.Column("camera", sa.Text, nullable=False),
        sa.Column("since_ms", Ms, nullable=False),
        sa.Column("archiver", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("camera", "since_ms"),
    )
    op.create_table(
        "audit_events",
        sa.Column("archiver", sa.Text, nullable=False),
        sa.Column("seq", Ms, nullable=False),
        sa.Column("ts_ms", Ms, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("entry", sa.Text, nullable=False),
        sa.Column("line_sha256", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("archiver", "seq"),
    )
    op.create_index("audit_events_by_time", "audit_events", ["ts_ms"])


def downgrade() -> None:
    raise NotImplementedError("The directory migrates forward only (restore a backup).")
