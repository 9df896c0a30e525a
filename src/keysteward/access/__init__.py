"""The one access path (DESIGN.md section 2): every key use is a principal asking to do an action on a resource.

A front-end (REST router, NBD proxy, and the KMIP and XKS listeners to come) authenticates its caller its
own way, builds an :class:`~keysteward.access.request.AccessRequest` and hands it to
:class:`~keysteward.access.service.AccessService`, which decides it in one order: principal and nonce,
evidence to facts, revocations, the tenant's Cedar policy, the action's bookkeeping committed with its
audit record, and only then, on permit, delivery. Actions are entries of one table
(:mod:`keysteward.access.actions`); a new protocol adds entries, not a path.
"""
