"""wordings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 02:40:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('wordings',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('relation', sa.Text(), nullable=False),
    sa.Column('wording', sa.Text(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_wordings'))
    )
    with op.batch_alter_table('wordings', schema=None) as batch_op:
        batch_op.create_index('ix_wordings_relation_wording', ['relation', 'wording'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('wordings', schema=None) as batch_op:
        batch_op.drop_index('ix_wordings_relation_wording')

    op.drop_table('wordings')
