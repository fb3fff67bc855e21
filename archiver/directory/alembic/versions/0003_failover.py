"""No single point of failure (issue 22): each camera's ordered Archivers (a primary, then its
standbys), whether all of them record it at once (redundant archiving), and who records it now
(its lease).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0 for every existing camera: one Archiver records it, as before.
    op.add_column("cameras", sa.Column("redundant", sa.Integer, nullable=False,
                                       server_default=sa.text("0")))
    op.create_table(
        "camera_archivers",
        sa.Column("camera", sa.Text, nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("archiver", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("camera", "rank"),
        sa.UniqueConstraint("camera", "archiver"),
    )
    # Who records a camera with standbys now (schema.py, camera_leases).
    op.create_table(
        "camera_leases",
        sa.Column("camera", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("expires_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  nullable=False),
        sa.Column("locked", sa.Integer, nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    raise NotImplementedError("The directory migrates forward only (restore a backup).")
