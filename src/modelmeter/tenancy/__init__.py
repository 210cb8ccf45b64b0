"""Tenancy: tenants (with their billing-account columns) and their API keys; tables and queries.

Below ``billing``, ``models`` and ``gateway``; above ``settings``, ``errors``, ``clock``, ``ids`` and ``db``.
"""
