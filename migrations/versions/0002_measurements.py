"""measurements

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 19:56:04.925572
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('measurements',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('revision_id', sa.Integer(), nullable=False),
    sa.Column('edit_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('metrics_json', sa.Text(), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['edit_id'], ['edits.id'], name=op.f('fk_measurements_edit_id_edits')),
    sa.ForeignKeyConstraint(['revision_id'], ['revisions.id'], name=op.f('fk_measurements_revision_id_revisions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_measurements'))
    )
    with op.batch_alter_table('measurements', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_measurements_edit_id'), ['edit_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_measurements_revision_id'), ['revision_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('measurements', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_measurements_revision_id'))
        batch_op.drop_index(batch_op.f('ix_measurements_edit_id'))

    op.drop_table('measurements')
