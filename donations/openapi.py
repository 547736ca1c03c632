"""The OpenAPI 3 description of the HTTP interface, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from donations import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ERROR, description)


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "donations",
        "version": __version__,
        "description": "A reader-funded publisher's system of record for Stripe money.",
    },
    "paths": {
        "/webhooks/stripe": {
            "post": {
                "summary": "Receive a Stripe event",
                "description": "Verified by Stripe-Signature (5 minute tolerance, any configured "
                "secret). Answered 2xx only once the event is durably stored; duplicates too.",
                "parameters": [{"name": "Stripe-Signature", "in": "header", "required": True,
                                "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object"}}}},
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "received": {"type": "boolean"},
                        "outcome": {"type": "string", "enum": [
                            "processed", "ignored", "needs_attention", "duplicate"]},
                    }}, "Stored (and applied, ignored or set aside for attention)"),
                    "400": _error("Bad or missing signature, malformed body, not an event, "
                                  "or an event of the other livemode"),
                    "413": _error("Body over 1 MiB"),
                    "500": _error("Stored, but applying it failed; Stripe will retry"),
                    "503": _error("The database is unavailable or no webhook secret is set"),
                },
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {
            "200": _json({"type": "object"}, "The process answers")}}},
        "/readyz": {"get": {"summary": "Readiness", "responses": {
            "200": _json({"type": "object"}, "Database reachable, migrations applied"),
            "503": _json({"type": "object"}, "Database unreachable or migrations pending")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {
            "200": _json({"type": "object"}, "OpenAPI 3 description")}}},
    },
    "components": {
        "schemas": {
            "Money": {
                "type": "object",
                "required": ["amount", "currency"],
                "properties": {
                    "amount": {"type": "integer", "description": "minor units"},
                    "currency": {"type": "string", "pattern": "^[a-z]{3}$"},
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "field": {"type": "string"},
                    },
                }},
            },
        },
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}
