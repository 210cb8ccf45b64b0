"""Stripe, exactly once: a transactional outbox, a relay that sends it through an injected ``StripeClient``, and
the webhook events that come back.

Modules (each imports only those above it in this list, plus ``billing.tables``/``catalog`` and ``tenancy``)
    ``client``    which keys are accepted, the ``StripeClient`` built from settings, which errors retry
    ``outbox``    writing outbox rows inside the caller's transaction (``enqueue_*``, ``enable_outbox``)
    ``dunning``   past due: ``billing_status`` derived from failed invoices, suspension after the grace period
    ``mirror``    look before create: the Stripe object behind each row, and its ids recorded on our side
    ``relay``     ``StripeRelay``: leases rows, keeps each tenant's order, backs off, reports
    ``webhooks``  signature verification and the events that are applied (``HANDLED_EVENTS``)

Mapping (every Stripe id is kept on our side)
    tenant          -> Customer (email, name, ``metadata.tenant_id``)              ``tenant.stripe_customer_id``
    plan            -> Product ``mm_<plan>`` + Plan ``mm_<plan>_<currency>_monthly``  ``stripe_plan``
    tenant's plan   -> Subscription to that Plan (``metadata.mm_change_id``)       ``tenant.stripe_subscription_id``
    closed invoice  -> one invoice item per line, with the line's exact ``amount`` in cents, then an Invoice that
                       takes them (``metadata.mm_invoice_id``), finalised where the API allows
                                               ``invoice.stripe_invoice_id``, ``invoice_line.stripe_invoice_item_id``
    credit purchase -> one invoice item ``Prepaid credits`` for the amount, on an Invoice of its own
                       (``metadata.mm_purchase_id``), finalised        ``credit_purchase.stripe_invoice_id``
    Stripe prices nothing itself: every cent comes from our invoice lines (the base fee is one of them, prorated by
    the second), so the Plan behind a subscription is priced 0 and no charge can be counted twice.

Exactly once
    1. ``enqueue_*`` writes a ``stripe_outbox`` row in the transaction of the change that causes it, with a
       deterministic idempotency key ``mm-<kind>-<object_id>`` (only when Stripe is configured: ``enable_outbox``).
    2. ``StripeRelay`` leases a due row, looks in Stripe for the object carrying our metadata, creates it only when
       absent (passing the idempotency key), then records the Stripe ids and marks the row done in one transaction.
       A crash between the Stripe call and the mark leaves the row pending; the next attempt finds the object
       instead of creating a second one (Stripe forgets idempotency keys after 24 hours; emulators ignore them).
    3. One tenant's rows go in ``id`` order: a row that waits holds back that tenant's later rows. Network and
       server errors retry forever with exponential backoff; other errors ``max_attempts`` times, then ``failed``.

Webhooks
    ``handle_event`` applies a verified event once (``stripe_event`` is keyed by event id). The state it leaves is a
    function of the set of events received, not of their order: ``paid`` is final, a payment failure only records
    its earliest time, and a tenant is ``past_due`` while one of its unpaid invoices has a failure.
    ``invoice.paid`` for a credit purchase grants its credits once (the purchase row is the guard: ``paid`` once,
    and ``credit_grant.purchase_id`` is unique); a failed top-up payment grants nothing and sets no ``past_due``.

Tenant columns are read and written through :class:`modelmeter.tenancy.tenants.Tenant` (the one definition of
the table).
"""
