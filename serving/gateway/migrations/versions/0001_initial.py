"""The gateway's tables before tokens could expire: tokens, usage, conversations and messages, exchanges, feedback,
arena matches (what SQLAlchemy's create_all made in the releases before migrations, less api_tokens.expires_at).

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('role', sa.String(length=10), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_index(op.f('ix_api_tokens_digest'), 'api_tokens', ['digest'], unique=True)
    op.create_table('arena',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_name', sa.String(length=100), nullable=False),
    sa.Column('messages', sa.Text(), nullable=False),
    sa.Column('model_a', sa.String(length=200), nullable=False),
    sa.Column('version_a', sa.String(length=50), nullable=False),
    sa.Column('answer_a', sa.Text(), nullable=False),
    sa.Column('request_a', sa.String(length=64), nullable=False),
    sa.Column('model_b', sa.String(length=200), nullable=False),
    sa.Column('version_b', sa.String(length=50), nullable=False),
    sa.Column('answer_b', sa.Text(), nullable=False),
    sa.Column('request_b', sa.String(length=64), nullable=False),
    sa.Column('winner', sa.String(length=4), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('voted_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_arena_created_at'), 'arena', ['created_at'], unique=False)
    op.create_index(op.f('ix_arena_token_name'), 'arena', ['token_name'], unique=False)
    op.create_index(op.f('ix_arena_version_a'), 'arena', ['version_a'], unique=False)
    op.create_index(op.f('ix_arena_version_b'), 'arena', ['version_b'], unique=False)
    op.create_index(op.f('ix_arena_voted_at'), 'arena', ['voted_at'], unique=False)
    op.create_table('conversations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_name', sa.String(length=100), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=True),
    sa.Column('system_prompt', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_conversations_token_name'), 'conversations', ['token_name'], unique=False)
    op.create_table('exchanges',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('token_name', sa.String(length=100), nullable=False),
    sa.Column('messages', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_exchanges_request_id'), 'exchanges', ['request_id'], unique=True)
    op.create_index(op.f('ix_exchanges_token_name'), 'exchanges', ['token_name'], unique=False)
    op.create_table('feedback',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('token_name', sa.String(length=100), nullable=False),
    sa.Column('alias', sa.String(length=200), nullable=True),
    sa.Column('version', sa.String(length=50), nullable=True),
    sa.Column('rating', sa.Integer(), nullable=True),
    sa.Column('correction', sa.Text(), nullable=True),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_feedback_created_at'), 'feedback', ['created_at'], unique=False)
    op.create_index(op.f('ix_feedback_request_id'), 'feedback', ['request_id'], unique=True)
    op.create_index(op.f('ix_feedback_token_name'), 'feedback', ['token_name'], unique=False)
    op.create_index(op.f('ix_feedback_version'), 'feedback', ['version'], unique=False)
    op.create_table('usage',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('token_name', sa.String(length=100), nullable=True),
    sa.Column('requested_model', sa.String(length=200), nullable=True),
    sa.Column('alias', sa.String(length=200), nullable=True),
    sa.Column('version', sa.String(length=50), nullable=True),
    sa.Column('upstream_model', sa.String(length=200), nullable=True),
    sa.Column('replica', sa.String(length=300), nullable=True),
    sa.Column('canary', sa.Boolean(), nullable=False),
    sa.Column('route', sa.String(length=100), nullable=True),
    sa.Column('stream', sa.Boolean(), nullable=False),
    sa.Column('input_tokens', sa.Integer(), nullable=True),
    sa.Column('output_tokens', sa.Integer(), nullable=True),
    sa.Column('ttft_ms', sa.Float(), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('status', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=True),
    sa.Column('answer', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_usage_created_at'), 'usage', ['created_at'], unique=False)
    op.create_index(op.f('ix_usage_request_id'), 'usage', ['request_id'], unique=False)
    op.create_index(op.f('ix_usage_token_name'), 'usage', ['token_name'], unique=False)
    op.create_table('messages',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('conversation_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=20), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_messages_conversation_id'), 'messages', ['conversation_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_messages_conversation_id'), table_name='messages')
    op.drop_table('messages')
    op.drop_index(op.f('ix_usage_token_name'), table_name='usage')
    op.drop_index(op.f('ix_usage_request_id'), table_name='usage')
    op.drop_index(op.f('ix_usage_created_at'), table_name='usage')
    op.drop_table('usage')
    op.drop_index(op.f('ix_feedback_version'), table_name='feedback')
    op.drop_index(op.f('ix_feedback_token_name'), table_name='feedback')
    op.drop_index(op.f('ix_feedback_request_id'), table_name='feedback')
    op.drop_index(op.f('ix_feedback_created_at'), table_name='feedback')
    op.drop_table('feedback')
    op.drop_index(op.f('ix_exchanges_token_name'), table_name='exchanges')
    op.drop_index(op.f('ix_exchanges_request_id'), table_name='exchanges')
    op.drop_table('exchanges')
    op.drop_index(op.f('ix_conversations_token_name'), table_name='conversations')
    op.drop_table('conversations')
    op.drop_index(op.f('ix_arena_voted_at'), table_name='arena')
    op.drop_index(op.f('ix_arena_version_b'), table_name='arena')
    op.drop_index(op.f('ix_arena_version_a'), table_name='arena')
    op.drop_index(op.f('ix_arena_token_name'), table_name='arena')
    op.drop_index(op.f('ix_arena_created_at'), table_name='arena')
    op.drop_table('arena')
    op.drop_index(op.f('ix_api_tokens_digest'), table_name='api_tokens')
    op.drop_table('api_tokens')
