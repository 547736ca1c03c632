"""The progress bar as an accessible SVG image, its size and colours taken from query parameters."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from donations import display
from donations.errors import BadRequest
from donations.inputs import whole_number
from donations.totals import Totals

MIN_WIDTH, MAX_WIDTH = 200, 1200
_COLOUR = re.compile(r"^#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")


@dataclass(frozen=True, slots=True)
class Style:
    width: int = 480
    bar: str = "#0a7c53"
    track: str = "#e5e7eb"
    text: str = "#1f2937"
    background: str | None = None  # transparent

    def key(self) -> str:
        """What makes two images of the same figures differ (for the ETag)."""
        return f"{self.width}|{self.bar}|{self.track}|{self.text}|{self.background}"


DEFAULT = Style()


def _colour(query: Mapping[str, str], name: str, default: str | None) -> str | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    match = _COLOUR.match(raw)
    if not match:
        raise BadRequest("invalid_colour", f"{name} must be a hex colour such as 0a7c53 or #fff",
                         field=name)
    digits = match.group(1).lower()
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return f"#{digits}"


def parse_style(query: Mapping[str, str]) -> Style:
    """The style the query asks for; a bad value is a 400 naming the parameter (never echoed)."""
    width = DEFAULT.width
    if query.get("width"):
        number = whole_number(query["width"])
        if number is None or not MIN_WIDTH <= number <= MAX_WIDTH:
            raise BadRequest("invalid_width", f"width must be a whole number of pixels from "
                             f"{MIN_WIDTH} to {MAX_WIDTH}", field="width")
        width = number
    return Style(
        width=width,
        bar=_colour(query, "bar", DEFAULT.bar) or DEFAULT.bar,
        track=_colour(query, "track", DEFAULT.track) or DEFAULT.track,
        text=_colour(query, "text", DEFAULT.text) or DEFAULT.text,
        background=_colour(query, "background", None),
    )


def progress_svg(totals: Totals, style: Style) -> str:
    """The image: the summary line above a bar filled to the share of the goal raised."""
    summary = display.summary(totals)
    label = f"{display.heading(totals)}: {summary}"
    width = style.width
    pad = 8
    font = max(11, min(16, width // 32))
    inner = width - 2 * pad
    has_bar = totals.goal is not None
    height = pad * 2 + font + (18 if has_bar else 4)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-labelledby="title" '
        f"aria-label={quoteattr(label)}>",
        f'<title id="title">{escape(label)}</title>',
    ]
    if style.background:
        parts.append(f'<rect width="{width}" height="{height}" fill="{style.background}"/>')
    parts.append(
        f'<text x="{pad}" y="{pad + font}" fill="{style.text}" font-size="{font}" '
        "font-family=\"system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, "
        f'sans-serif">{escape(summary)}</text>'
    )
    if has_bar:
        top = pad + font + 8
        filled = inner * display.percent_filled(totals) // 100
        parts.append(f'<rect x="{pad}" y="{top}" width="{inner}" height="10" rx="5" '
                     f'fill="{style.track}"/>')
        if filled:
            parts.append(f'<rect x="{pad}" y="{top}" width="{filled}" height="10" rx="5" '
                         f'fill="{style.bar}"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
