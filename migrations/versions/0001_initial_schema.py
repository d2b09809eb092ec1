"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 19:41:30.310086
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0001'
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('command', sa.String(length=32), nullable=False),
    sa.Column('revision_id', sa.Integer(), nullable=True),
    sa.Column('edit_id', sa.Integer(), nullable=True),
    sa.Column('details_json', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_actor'), ['actor'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_revision_id'), ['revision_id'], unique=False)

    op.create_table('blobs',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_blobs'))
    )
    op.create_table('reflog',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('ref', sa.String(length=200), nullable=False),
    sa.Column('old_revision', sa.Integer(), nullable=True),
    sa.Column('new_revision', sa.Integer(), nullable=True),
    sa.Column('old_symbolic', sa.String(length=200), nullable=True),
    sa.Column('new_symbolic', sa.String(length=200), nullable=True),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reflog'))
    )
    with op.batch_alter_table('reflog', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reflog_ref'), ['ref'], unique=False)

    op.create_table('revisions',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('operation', sa.String(length=16), nullable=False),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('depth', sa.Integer(), nullable=False),
    sa.Column('n_active', sa.Integer(), nullable=False),
    sa.Column('checkpoint', sa.LargeBinary(), nullable=True),
    sa.Column('chain_hash', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['parent_id'], ['revisions.id'], name=op.f('fk_revisions_parent_id_revisions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_revisions'))
    )
    with op.batch_alter_table('revisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_revisions_parent_id'), ['parent_id'], unique=False)

    op.create_table('settings',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_settings'))
    )
    op.create_table('edits',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('fact_json', sa.Text(), nullable=False),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('relation', sa.Text(), nullable=True),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('config_json', sa.Text(), nullable=False),
    sa.Column('blob_sha256', sa.String(length=64), nullable=False),
    sa.Column('metrics_json', sa.Text(), nullable=False),
    sa.Column('stats_json', sa.Text(), nullable=False),
    sa.Column('versions_json', sa.Text(), nullable=False),
    sa.Column('trained_on', sa.Integer(), nullable=True),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['blob_sha256'], ['blobs.sha256'], name=op.f('fk_edits_blob_sha256_blobs')),
    sa.ForeignKeyConstraint(['trained_on'], ['revisions.id'], name=op.f('fk_edits_trained_on_revisions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_edits'))
    )
    with op.batch_alter_table('edits', schema=None) as batch_op:
        batch_op.create_index('ix_edits_subject_relation', ['subject', 'relation'], unique=False)

    op.create_table('refs',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('revision_id', sa.Integer(), nullable=True),
    sa.Column('symbolic', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['revision_id'], ['revisions.id'], name=op.f('fk_refs_revision_id_revisions')),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_refs'))
    )
    op.create_table('revision_changes',
    sa.Column('revision_id', sa.Integer(), nullable=False),
    sa.Column('edit_id', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=8), nullable=False),
    sa.ForeignKeyConstraint(['edit_id'], ['edits.id'], name=op.f('fk_revision_changes_edit_id_edits')),
    sa.ForeignKeyConstraint(['revision_id'], ['revisions.id'], name=op.f('fk_revision_changes_revision_id_revisions')),
    sa.PrimaryKeyConstraint('revision_id', 'edit_id', name=op.f('pk_revision_changes'))
    )
    with op.batch_alter_table('revision_changes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_revision_changes_edit_id'), ['edit_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('revision_changes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_revision_changes_edit_id'))

    op.drop_table('revision_changes')
    op.drop_table('refs')
    with op.batch_alter_table('edits', schema=None) as batch_op:
        batch_op.drop_index('ix_edits_subject_relation')

    op.drop_table('edits')
    op.drop_table('settings')
    with op.batch_alter_table('revisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_revisions_parent_id'))

    op.drop_table('revisions')
    with op.batch_alter_table('reflog', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reflog_ref'))

    op.drop_table('reflog')
    op.drop_table('blobs')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_revision_id'))
        batch_op.drop_index(batch_op.f('ix_audit_events_created_at'))
        batch_op.drop_index(batch_op.f('ix_audit_events_actor'))

    op.drop_table('audit_events')
