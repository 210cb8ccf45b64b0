"""Service functions: each owns its transaction and spans tenancy, billing and models, so that the routes (admin
and tenant) and the CLI call one function and every rule (a plan must exist, only an active key can be rolled, a
job must fit the training quota) lives once.

Above ``billing`` and ``models``; below ``gateway`` and ``cli``.
"""
