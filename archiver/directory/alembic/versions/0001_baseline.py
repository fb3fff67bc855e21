"""Baseline: the directory tables of the legacy SQLite index at version 7 (cameras, viewers and
their cameras, evidence holds, access grants, admins). An old data directory's file has them
already (archiver/migrations.py made them) and is stamped at this revision, not upgraded.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen here (not imported from schema.py, which moves on): a revision never changes.
Ms = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "cameras",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("token_sha256", sa.LargeBinary, nullable=False),
        sa.Column("rtsp_url", sa.Text),
        sa.Column("created_ms", Ms, nullable=False),
        sa.Column("removed_ms", Ms),
        sa.Column("retention_days", sa.Integer),
    )
    op.create_table(
        "viewers",
        sa.Column("fingerprint", sa.Text, primary_key=True),
        sa.Column("certificate", sa.LargeBinary, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("oaep_hash", sa.Integer, nullable=False),
        sa.Column("all_cameras", sa.Integer, nullable=False),
        sa.Column("added_ms", Ms, nullable=False),
        sa.Column("revoked_ms", Ms),
        sa.Column("key_streams_deleted", sa.Integer, nullable=False, server_default=sa.text("0")),
    )
    op.create_table(
        "viewer_cameras",
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("camera", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", "camera"),
    )
    op.create_table(
        "holds",
        sa.Column("hold_id", Ms, primary_key=True, autoincrement=True),
        sa.Column("camera", sa.Text, nullable=False),
        sa.Column("from_ms", Ms, nullable=False),
        sa.Column("to_ms", Ms, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("created_ms", Ms, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("holds_by_camera", "holds", ["camera", "from_ms", "to_ms"])
    op.create_table(
        "access_grants",
        sa.Column("grant_id", sa.Text, primary_key=True),
        sa.Column("camera", sa.Text, nullable=False),
        sa.Column("from_ms", Ms, nullable=False),
        sa.Column("to_ms", Ms, nullable=False),
        sa.Column("grantor", sa.Text, nullable=False),
        sa.Column("grantee", sa.Text, nullable=False),
        sa.Column("key_count", sa.Integer, nullable=False),
        sa.Column("created_ms", Ms, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("decided_ms", Ms),
        sa.Column("decided_by", sa.Text),
        sa.Column("note", sa.Text),
        sa.Column("blob", sa.LargeBinary, nullable=False),
    )
    op.create_index("access_grants_by_grantee", "access_grants", ["grantee"])
    op.create_table(
        "admins",
        sa.Column("fingerprint", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("certificate", sa.LargeBinary, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("oaep_hash", sa.Integer, nullable=False),
        sa.Column("added_ms", Ms, nullable=False),
        sa.Column("added_by", sa.Text, nullable=False),
        sa.Column("revoked_ms", Ms),
        sa.Column("revoked_by", sa.Text),
        sa.UniqueConstraint("name"),
    )


def downgrade() -> None:
    raise NotImplementedError("The directory migrates forward only (restore a backup).")
