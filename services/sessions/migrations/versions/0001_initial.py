"""Sessions, their tags, messages and remembered exchanges.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from services.common.database import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("name_is_auto", sa.Boolean(), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("document_ids", sa.JSON(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("auto_tags", sa.JSON(), nullable=False),
        sa.Column("system_prompt", sa.Text(), nullable=False),
        sa.Column("generation", sa.JSON(), nullable=False),
        sa.Column("message_count", sa.Integer(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("last_exchange_at", UtcDateTime(), nullable=True),
    )
    op.create_index(
        "ix_sessions_tenant_last_exchange", "sessions", ["tenant", "last_exchange_at", "id"]
    )
    op.create_index("ix_sessions_tenant_created", "sessions", ["tenant", "created_at", "id"])
    op.create_table(
        "session_tags",
        sa.Column(
            "session_id",
            sa.String(36),
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("tag", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(8), primary_key=True),
    )
    op.create_index("ix_session_tags_tag", "session_tags", ["tag"])
    op.create_table(
        "messages",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "session_id",
            sa.String(36),
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("client_request_id", sa.String(128), nullable=True),
        sa.Column("reply_to", sa.String(36), nullable=True),
        sa.Column("citations", sa.JSON(), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("time_to_first_token_seconds", sa.Float(), nullable=False),
        sa.Column("total_seconds", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("session_id", "client_request_id", name="uq_messages_client_request"),
    )
    op.create_index("ix_messages_session_seq", "messages", ["session_id", "seq"], unique=True)
    op.create_table(
        "exchanges",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "session_id",
            sa.String(36),
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("user_message_id", sa.String(36), nullable=False),
        sa.Column("assistant_message_id", sa.String(36), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("indexed", sa.Boolean(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_exchanges_session_id", "exchanges", ["session_id"])
    op.create_index("ix_exchanges_tenant", "exchanges", ["tenant"])
    op.create_index("ix_exchanges_indexed", "exchanges", ["indexed"])


def downgrade() -> None:
    for table in ("exchanges", "messages", "session_tags", "sessions"):
        op.drop_table(table)
