"""Each document names the vector collection its chunks' vectors went to.

Revision ID: 0002
Revises: 0001

Documents made READY before this revision name none (""): their vectors lived in the
chunk rows (and in Qdrant when configured); `python -m services.ingest.repair` assigns
them the collection of the model the embed service serves and writes their vectors there.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "documents",
        sa.Column("vector_collection", sa.String(255), nullable=False, server_default=""),
    )


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("vector_collection")
