"""A fake Stripe for tests: object factories, a simulator, webhook signing and an API server."""

from .objects import API_VERSION, IdGenerator, event
from .server import FakeStripe, RecordedRequest, running_fake_stripe
from .signing import sign, signed_request
from .world import (
    DisputeResult,
    Emitted,
    InvoiceRun,
    Payment,
    PayoutResult,
    RefundResult,
    Subscribed,
    World,
)

__all__ = [
    "API_VERSION",
    "DisputeResult",
    "Emitted",
    "FakeStripe",
    "IdGenerator",
    "InvoiceRun",
    "Payment",
    "PayoutResult",
    "RecordedRequest",
    "RefundResult",
    "Subscribed",
    "World",
    "event",
    "running_fake_stripe",
    "sign",
    "signed_request",
]
