"""Cedar policy: the schema, the per-tenant policy store, evaluation and quorum approvals."""
