"""The store: tables, migrations, the task store the API and the reconciler share, TES
schemas and views, admission, the event outbox, leases, backend health, retention.
"""
