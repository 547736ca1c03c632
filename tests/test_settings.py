"""Settings from the environment: the documented defaults, refusals that name the variable, and
secrets that never show themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from donations.settings import ConfigError, Secret, Settings

ROOT = Path(__file__).resolve().parent.parent

VALID = {
    "DATABASE_URL": "postgresql://donations:hunter2-db-password@db.internal:5432/donations",
    "STRIPE_SECRET_KEY": "sk_live_abc123DEF456",
    "STRIPE_WEBHOOK_SECRET": "whsec_current123, whsec_previous456",
}


def test_defaults_match_the_contract() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None  # an embedded PostgreSQL in the data folder
    assert settings.data_dir == Path(".donations")
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.stripe_secret_key is None
    assert settings.stripe_mode is None
    assert settings.stripe_webhook_secrets == ()
    assert settings.stripe_api_base is None
    assert settings.site_origins == ()
    assert settings.reporting_currency == "gbp"
    assert (settings.founding_seats, settings.founding_percent_off) == (1000, 50)
    assert settings.founding_coupon_id == "founding-supporter"
    assert settings.log_level == "info"
    assert settings.log_format == ("console" if sys.stderr.isatty() else "json")
    assert settings.fee_worker_interval == 5.0


def test_blank_values_count_as_unset() -> None:
    blank = {name: "  " for name in ("DATABASE_URL", "PORT", "REPORTING_CURRENCY", "LOG_LEVEL")}
    assert Settings.from_env(blank) == Settings.from_env({})


def test_every_variable_is_read() -> None:
    settings = Settings.from_env({
        **VALID,
        "DONATIONS_DATA_DIR": "/var/lib/donations",
        "HOST": "::1",
        "PORT": "9000",
        "STRIPE_API_BASE": "http://127.0.0.1:12111/",
        "SITE_ORIGINS": "https://Example.org/, https://shop.example.org",
        "REPORTING_CURRENCY": "EUR",
        "FOUNDING_SEATS": "250",
        "FOUNDING_PERCENT_OFF": "30",
        "FOUNDING_COUPON_ID": "early-bird",
        "LOG_FORMAT": "console",
        "LOG_LEVEL": "DEBUG",
        "FEE_WORKER_INTERVAL": "30",
    })
    assert settings.database_url == Secret(VALID["DATABASE_URL"])
    assert settings.data_dir == Path("/var/lib/donations")
    assert (settings.host, settings.port) == ("::1", 9000)
    assert settings.stripe_api_base == "http://127.0.0.1:12111"
    assert settings.site_origins == ("https://example.org", "https://shop.example.org")
    assert settings.reporting_currency == "eur"
    assert (settings.founding_seats, settings.founding_percent_off) == (250, 30)
    assert settings.founding_coupon_id == "early-bird"
    assert (settings.log_format, settings.log_level) == ("console", "debug")
    assert settings.fee_worker_interval == 30.0


def test_webhook_secrets_are_comma_separated_for_rotation() -> None:
    settings = Settings.from_env(VALID)
    assert [s.reveal() for s in settings.stripe_webhook_secrets] == [
        "whsec_current123", "whsec_previous456"]
    one = Settings.from_env({"STRIPE_WEBHOOK_SECRET": "whsec_only,"})
    assert [s.reveal() for s in one.stripe_webhook_secrets] == ["whsec_only"]


@pytest.mark.parametrize(
    ("key", "mode"),
    [("sk_live_abc", "live"), ("rk_live_abc", "live"), ("sk_test_abc", "test"),
     ("rk_test_abc", "test")],
)
def test_stripe_mode_follows_the_key(key: str, mode: str) -> None:
    assert Settings.from_env({"STRIPE_SECRET_KEY": key}).stripe_mode == mode


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("PORT", "-1"),
        ("PORT", "0"),  # "any free port": nobody would know where it listens
        ("HOST", "not a host!"),
        ("HOST", "[::1]"),
        ("HOST", "under_score.example"),
        ("STRIPE_SECRET_KEY", "pk_test_x"),
        ("STRIPE_SECRET_KEY", "sk_test_"),  # a prefix, and no key after it
        ("STRIPE_SECRET_KEY", "sk_live_abc def"),
        ("STRIPE_WEBHOOK_SECRET", "nope"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_good,nope"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_"),
        ("STRIPE_API_BASE", "ftp://stripe.example"),
        ("STRIPE_API_BASE", "http://exa mple"),
        ("SITE_ORIGINS", "https://a.org/path"),
        ("SITE_ORIGINS", "a.org"),
        ("REPORTING_CURRENCY", "pounds"),
        ("DATABASE_URL", "mysql://user:pw@localhost/donations"),
        ("LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
        ("FOUNDING_SEATS", "lots"),
        ("FOUNDING_PERCENT_OFF", "0"),
        ("FOUNDING_PERCENT_OFF", "150"),
        ("FEE_WORKER_INTERVAL", "0"),
    ],
)
def test_an_invalid_value_is_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({**VALID, name: value})
    assert str(raised.value).startswith(f"{name} ")


@pytest.mark.parametrize(
    ("name", "value"),
    [("STRIPE_SECRET_KEY", "pk_live_supersecret99"),
     ("STRIPE_WEBHOOK_SECRET", "whsec_fine,oops_supersecret99"),
     ("DATABASE_URL", "mysql://root:supersecret99@db/donations")],
)
def test_a_refused_secret_is_not_repeated_in_the_message(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({name: value})
    assert "supersecret99" not in str(raised.value)


def test_a_data_dir_under_home_is_expanded_as_a_shell_would() -> None:
    """Set by Docker or systemd, `~` reaches the service unexpanded: it is the home folder, not a
    folder named `~`."""
    settings = Settings.from_env({"DONATIONS_DATA_DIR": "~/donations-data"})
    assert settings.data_dir == Path.home() / "donations-data"


def test_secrets_never_show_in_a_repr_or_str() -> None:
    settings = Settings.from_env(VALID)
    for text in (repr(settings), str(settings), f"{settings}", repr(settings.stripe_secret_key)):
        assert "hunter2" not in text
        assert "abc123DEF456" not in text
        assert "current123" not in text and "previous456" not in text
    assert "**********" in repr(settings)
    assert str(Secret("x")) == repr(Secret("x")) == "Secret('**********')"
    assert settings.stripe_secret_key is not None
    assert settings.stripe_secret_key.reveal() == VALID["STRIPE_SECRET_KEY"]


@pytest.mark.parametrize(("name", "value"), [("PORT", "abc"), ("HOST", "not a host!")])
def test_serve_with_an_invalid_variable_exits_2_with_one_line_naming_it(
    tmp_path: Path, name: str, value: str
) -> None:
    """An invalid PORT or HOST stops `serve` at once with one line naming it, exit 2: nothing
    is migrated or started first, and no traceback from a bind that could never work."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PORT", "HOST")}
    env[name] = value
    env["DONATIONS_DATA_DIR"] = str(tmp_path)  # in case it started after all: not the repo's
    done = subprocess.run(
        [sys.executable, "-m", "donations", "serve"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert name in lines[0]
    assert "configuration error" in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("value", [
    "postgresql://u:supersecret99@[bad/db",  # urlsplit cannot read it
    "postgresql://u:supersecret99@localhost:notaport/db",  # asyncpg would fail at start
])
def test_a_malformed_database_url_is_one_line_without_the_password(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"DATABASE_URL": value})
    assert str(raised.value).startswith("DATABASE_URL ")
    assert "supersecret99" not in str(raised.value)


@pytest.mark.parametrize(("query", "said"), [
    ("sslmode=bogus", "sslmode must be one of"),
    ("sslmode=require&sslmode=Require", "sslmode must be one of"),  # the last one counts
    ("target_session_attrs=bogus", "target_session_attrs must be one of"),
    ("sslmode", "a query that cannot be read"),
    ("sslmode=require&&connect_timeout=5", "a query that cannot be read"),
    ("port=abc", "port must be a number"),
    ("host=a,b&port=5432,x", "port must be a number"),
])
def test_a_database_url_query_asyncpg_would_refuse_stops_the_start(query: str, said: str) -> None:
    """asyncpg refuses these only at the first connection, with a traceback: they are read at
    start, one line naming DATABASE_URL (and what is wrong, never the password)."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"DATABASE_URL": f"postgresql://u:supersecret99@db/x?{query}"})
    assert str(raised.value).startswith("DATABASE_URL ")
    assert said in str(raised.value)
    assert "supersecret99" not in str(raised.value)


def test_an_at_sign_in_the_database_password_must_be_written_percent_40() -> None:
    """asyncpg splits the URL at its first "@": `p@ss` would be the password `p` on the host
    `ss@db`, and the rest of the password would show in the errors that name that host."""
    with pytest.raises(ConfigError, match="DATABASE_URL has an @") as raised:
        Settings.from_env({"DATABASE_URL": "postgresql://u:super@secret99@db/x"})
    assert "secret99" not in str(raised.value)
    written = "postgresql://u:super%40secret99@db/x"
    assert Settings.from_env({"DATABASE_URL": written}).database_url == Secret(written)


@pytest.mark.parametrize("query", [
    "sslmode=disable", "sslmode=verify-full", "sslmode=verify_ca", "sslmode=",
    "target_session_attrs=read-write", "sslmode=require&target_session_attrs=prefer-standby",
    "application_name=donations",
])
def test_a_database_url_query_asyncpg_takes_is_kept(query: str) -> None:
    url = f"postgresql://u:pw@db/x?{query}"
    assert Settings.from_env({"DATABASE_URL": url}).database_url == Secret(url)


@pytest.mark.parametrize("value", [
    "https://[::1",  # urlsplit cannot read it
    "https://news.example:abc",  # else accepted, then dropped: every checkout 422
    "https://news.example:99999",
    "https://user@news.example",
    "https://news.example?x=1",
])
def test_a_malformed_site_origin_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"SITE_ORIGINS": value})
    assert str(raised.value).startswith("SITE_ORIGINS ")


@pytest.mark.parametrize("code", ["gpb", "abc", "eru"])
def test_a_reporting_currency_that_is_no_currency_stops_the_start(code: str) -> None:
    """REPORTING_CURRENCY must be a currency Stripe settles in: a typo (`gpb`) stops the start
    with one line naming it, instead of totals that stay 0 for ever."""
    with pytest.raises(ConfigError, match="REPORTING_CURRENCY"):
        Settings.from_env({"REPORTING_CURRENCY": code})


@pytest.mark.parametrize("host", ["999.1.1.1", "256.256.256.256", "1.2.3.4.5"])
def test_a_host_that_is_neither_an_address_nor_a_host_name_stops_the_start(host: str) -> None:
    """HOST is an IP address or a host name: a dotted-decimal form that is no IPv4 address is
    neither (RFC 1123 2.1: a name's last label is never all digits), and stops the start."""
    with pytest.raises(ConfigError, match="HOST"):
        Settings.from_env({"HOST": host})


@pytest.mark.parametrize("level", ["debug", "info"])
def test_stripe_log_that_would_print_requests_past_the_log_stops_the_start(level: str) -> None:
    """With STRIPE_LOG at debug or info the stripe library prints every request and answer to
    stderr itself (stripe/_util.py), the reader's e-mail in a checkout's form among them, where
    the service's log masking never sees it."""
    with pytest.raises(ConfigError, match=r"^STRIPE_LOG must not be debug or info"):
        Settings.from_env({"STRIPE_LOG": level})
    Settings.from_env({"STRIPE_LOG": ""})  # unset in all but name: nothing printed


def test_database_url_ports_asyncpg_reads_are_kept() -> None:
    for query in ("port=5433", "host=a,b&port=5432,5433"):
        url = f"postgresql://u@db/x?{query}"
        settings = Settings.from_env({"DATABASE_URL": url})
        assert settings.database_url is not None and settings.database_url.reveal() == url


@pytest.mark.parametrize("value", [
    "http://[::1",  # urlsplit raises ValueError: a traceback out of Settings.from_env
    "http://localhost:abc",  # a port that is no number: every Stripe call would fail
    "https://api.stripe.example:99999",  # a port out of range: likewise
])
def test_a_stripe_api_base_that_is_not_a_usable_url_is_a_config_error(value: str) -> None:
    """CONTRACT: "Invalid configuration stops the service at start with one line naming the
    variable and the problem". STRIPE_API_BASE is only checked for its scheme and netloc: an
    unclosed bracket makes urlsplit raise ValueError out of Settings.from_env (main catches only
    ConfigError: a traceback), and a port that is no number or out of range is accepted, so the
    service starts and every checkout, portal session and fee look-up then fails at Stripe's
    door. SITE_ORIGINS and DATABASE_URL already refuse the same mistakes."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"STRIPE_API_BASE": value})
    assert str(raised.value).startswith("STRIPE_API_BASE ")


@pytest.mark.parametrize("value", [
    "[" * 100_000,  # nested deeper than json.loads can go: RecursionError
    '{"gbp": {"month": {"minimum": ' + "9" * 5000 + "}}}",  # over Python's 4,300 digits
])
def test_checkout_amounts_json_that_cannot_be_read_is_a_config_error(value: str) -> None:
    """CHECKOUT_AMOUNTS is JSON read at start; offer.parse_overrides turns only JSONDecodeError
    into the one-line refusal. JSON nested thousands deep (RecursionError) or an integer of
    thousands of digits (ValueError) escapes Settings.from_env as a traceback instead of
    "CHECKOUT_AMOUNTS is not valid JSON" (the request bodies' reader, inputs.parse_json, already
    catches both)."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"CHECKOUT_AMOUNTS": value})
    assert str(raised.value).startswith("CHECKOUT_AMOUNTS")


def test_a_data_dir_under_an_unknown_users_home_is_a_config_error() -> None:
    """DONATIONS_DATA_DIR's leading `~` is read as a shell would; `~nosuchuser/data` (a typo in
    a unit file) is one line naming the variable, not a traceback out of Path.expanduser."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"DONATIONS_DATA_DIR": "~no_such_user_for_donations/data"})
    assert str(raised.value).startswith("DONATIONS_DATA_DIR: ")


def test_a_stripe_api_base_ending_in_v1_or_with_a_query_or_user_is_refused() -> None:
    """STRIPE_API_BASE is where the stripe library puts `/v1/…`: one written as Stripe's own
    URLs are (`…/v1`) would ask for `/v1/v1/…`, and a query, fragment or user would be dropped
    or sent where they do not belong; each stops the start with one line naming it. A proxy's
    path is kept."""
    for base in ("https://api.stripe.example/v1", "https://api.stripe.example/v1/",
                 "http://127.0.0.1:12111/?x=1", "http://127.0.0.1:12111/#top",
                 "http://user:pw@127.0.0.1:12111"):
        with pytest.raises(ConfigError) as raised:
            Settings.from_env({"STRIPE_API_BASE": base})
        assert str(raised.value).startswith("STRIPE_API_BASE "), base
    proxied = Settings.from_env({"STRIPE_API_BASE": "https://proxy.example/stripe/"})
    assert proxied.stripe_api_base == "https://proxy.example/stripe"
