"""Who may change things: the guard, the console's settings, the ops port's reset."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr

from worker.guard import change_refusal, cookie_ok, cookie_value, may_read
from worker.metrics import Metrics
from worker.ops import OpsServer
from worker.settings import SettingsError, load_settings

TOKEN = SecretStr("s3cret")


def test_same_origin_browser_request_may_change() -> None:
    """A request the console's own page sends passes, with or without a token set."""
    assert change_refusal("POST", {"Sec-Fetch-Site": "same-origin"}, None) is None
    assert change_refusal("POST", {"Sec-Fetch-Site": "same-origin"}, TOKEN) is None


@pytest.mark.parametrize("site", ["cross-site", "same-site", "none"])
def test_other_sites_may_not_change_even_with_the_token(site: str) -> None:
    """A browser request from anywhere but the page itself is refused, token or not."""
    headers = {"Sec-Fetch-Site": site, "Authorization": "Bearer s3cret"}
    assert change_refusal("POST", headers, TOKEN) is not None


def test_request_without_the_header_needs_the_bearer_token() -> None:
    """curl's request passes only with the right bearer token; reading is never refused here."""
    assert change_refusal("POST", {}, None) is not None
    assert change_refusal("POST", {"Authorization": "Bearer nope"}, TOKEN) is not None
    assert change_refusal("POST", {"Authorization": "Bearer s3cret"}, TOKEN) is None
    assert change_refusal("GET", {}, TOKEN) is None


def test_reading_needs_the_token_or_its_cookie_when_one_is_set() -> None:
    """Without a token anyone on the address may read; with one, bearer or cookie."""
    assert may_read({}, {}, None)
    assert not may_read({}, {}, TOKEN)
    assert may_read({"Authorization": "Bearer s3cret"}, {}, TOKEN)
    cookie = {"memory_worker_console": cookie_value(TOKEN)}
    assert may_read({}, cookie, TOKEN) and cookie_ok(cookie, TOKEN)
    assert "s3cret" not in cookie_value(TOKEN)


def test_console_settings_defaults_and_secret() -> None:
    """Loopback, port 9470, no token; the token is a secret that never prints."""
    settings = load_settings({"console": {"token": "s3cret", "workers": ["http://w1:9464"]}})
    assert (settings.console.host, settings.console.port) == ("127.0.0.1", 9470)
    assert "s3cret" not in repr(settings.console)
    assert [str(u) for u in settings.console.workers] == ["http://w1:9464/"]


def test_unknown_console_key_names_what_was_meant() -> None:
    """A typo in the console section stops with the key it most likely meant."""
    with pytest.raises(SettingsError, match=r"console\.tokn .*did you mean console\.token"):
        load_settings({"console": {"tokn": "x"}})


async def test_ops_reset_has_the_console_guard() -> None:
    """POST /insertion-metrics/reset: 403 cross-site or without the token, 200 with it."""
    metrics = Metrics(4)
    async with OpsServer(metrics, lambda: True, "127.0.0.1", 0, token=TOKEN) as ops:
        url = f"http://127.0.0.1:{ops.port}/insertion-metrics/reset"
        async with httpx.AsyncClient() as client:
            site = await client.post(url, headers={"Sec-Fetch-Site": "cross-site"})
            bare = await client.post(url)
            bearer = await client.post(url, headers={"Authorization": "Bearer s3cret"})
    assert (site.status_code, bare.status_code, bearer.status_code) == (403, 403, 200)
