"""Figures written for people: money with its symbol and separators, and the one-line summary."""

from __future__ import annotations

from donations.money import exponent
from donations.totals import Totals

# Symbols readers of an English-language site recognise; any other currency is written with its
# ISO code ("BHD 1,234.500"), which is never ambiguous.
SYMBOLS = {
    "gbp": "£", "usd": "$", "eur": "€", "jpy": "¥", "inr": "₹", "krw": "₩", "ils": "₪",
    "ngn": "₦", "php": "₱", "aud": "A$", "cad": "CA$", "nzd": "NZ$", "hkd": "HK$", "sgd": "S$",
    "mxn": "MX$", "brl": "R$", "cny": "CN¥",
}


def money(amount: int, currency: str) -> str:
    """`123456, "gbp"` → `£1,234.56`; `500000, "gbp"` → `£5,000`; `1000, "jpy"` → `¥1,000`.

    Whole amounts are written without the minor unit (a banner's "£50,000"); others with every
    decimal place the currency has (three for BHD), never rounded.
    """
    places = exponent(currency)
    whole, fraction = divmod(abs(amount), 10**places)
    number = f"{whole:,}" + (f".{fraction:0{places}d}" if fraction else "")
    symbol = SYMBOLS.get(currency.lower())
    text = f"{symbol}{number}" if symbol else f"{currency.upper()}\u00a0{number}"
    return f"-{text}" if amount < 0 else text


def count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def summary(totals: Totals) -> str:
    """"£12,345 raised of £50,000 · 321 supporters" (without "of …" when there is no goal)."""
    raised = money(totals.raised.amount, totals.raised.currency)
    goal = f" of {money(totals.goal.amount, totals.goal.currency)}" if totals.goal else ""
    return f"{raised} raised{goal} · {count(totals.supporters, 'supporter', 'supporters')}"


def heading(totals: Totals) -> str:
    return totals.title or "Reader contributions"


def percent_filled(totals: Totals) -> int:
    """How full the progress bar is, 0 to 100 (whole percent, rounded down; 100 once reached)."""
    if totals.goal is None:
        return 0
    return min(100, totals.raised.amount * 100 // totals.goal.amount)
