"""donations: a reader-funded publisher's system of record for the money it takes through Stripe."""

__version__ = "0.1.0"
