"""The console's handlers and guard, on aiohttp's test client with a snapshot and no broker."""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from tests.unit.console_fakes import FakeJobs, letter, state
from worker.console.app import build_app
from worker.console.server import bind_refusal
from worker.dlq_model import DeadLetter

BROWSER = {"Sec-Fetch-Site": "same-origin"}
SCRIPT = b'{"content": "<script>alert(1)</script><img src=x onerror=alert(2)>"}'


@asynccontextmanager
async def client(
    letters: list[DeadLetter], **options: Any
) -> AsyncIterator[tuple[TestClient[Any, Any], FakeJobs]]:
    """A test client on a console whose snapshot holds `letters`."""
    console, jobs = state(letters, **options)
    async with TestClient(TestServer(build_app(console))) as test_client:
        yield test_client, jobs


def sample() -> list[DeadLetter]:
    """Three rejected by the sink, two schema failures."""
    return [letter(n) for n in range(3)] + [letter(n, "schema", "no content") for n in (3, 4)]


async def test_groups_page_lists_each_reason_with_its_count() -> None:
    """/dlq shows one row per reason with its count, and the group actions."""
    async with client(sample()) as (c, _):
        answer = await c.get("/dlq")
        text = await answer.text()
    assert answer.status == 200
    assert 'data-reason="rejected_by_sink"' in text and 'data-reason="schema"' in text
    assert "Replay 3" in text and "Purge 2" in text
    assert "replay cannot fix schema" in text


async def test_message_content_is_escaped_and_bytes_shown_escaped() -> None:
    """Markup in a body is shown as text; bytes that are not UTF-8 appear as escapes."""
    letters = [letter(0, body=SCRIPT), letter(1, body=b"\xff\xfe not utf-8")]
    async with client(letters) as (c, _):
        script = await (await c.get(f"/dlq/message/{letters[0].fingerprint}")).text()
        raw = await (await c.get(f"/dlq/message/{letters[1].fingerprint}")).text()
    assert "<script>alert" not in script and "&lt;script&gt;alert(1)&lt;/script&gt;" in script
    assert "<img src=x" not in script
    assert "\\xff\\xfe not utf-8" in raw


async def test_every_answer_forbids_inline_script() -> None:
    """The content security policy lets only the console's own script file run."""
    async with client(sample()) as (c, _):
        answer = await c.get("/")
    policy = answer.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy


async def test_group_page_is_paginated() -> None:
    """A group of more than a page shows the first page and a link to the next."""
    async with client([letter(n) for n in range(120)]) as (c, _):
        text = await (await c.get("/dlq/reason/rejected_by_sink?page=2")).text()
    assert "Page 2 of 3" in text and "?page=3" in text and "?page=1" in text


async def test_group_replay_from_the_page_starts_a_paced_job() -> None:
    """A same-origin replay of a group acts on exactly the group's copies, at the rate given."""
    letters = sample()
    async with client(letters) as (c, jobs):
        form = {"scope": "group", "reason": "rejected_by_sink", "rate": "20"}
        answer = await c.post("/actions/replay", data=form, headers=BROWSER, allow_redirects=False)
    assert answer.status == 303 and answer.headers["Location"] == "/jobs/1"
    job = jobs.jobs[1]
    assert job.selection.fingerprints == {d.fingerprint: 1 for d in letters[:3]}
    assert job.rate_per_s == 20.0 and job.selection.reason == "rejected_by_sink"


async def test_replay_rate_defaults_to_the_setting() -> None:
    """Without a rate in the form a replay is paced at console.replay_rate_per_s."""
    letters = sample()
    async with client(letters, replay_rate_per_s=7) as (c, jobs):
        form = {"scope": "one", "fp": letters[0].fingerprint}
        await c.post("/actions/replay", data=form, headers=BROWSER, allow_redirects=False)
    assert jobs.jobs[1].rate_per_s == 7.0


async def test_purge_needs_the_count_typed() -> None:
    """A purge whose typed count differs from what was chosen is refused, and nothing starts."""
    async with client(sample()) as (c, jobs):
        form = {"scope": "group", "reason": "schema", "confirm": "3"}
        wrong = await c.post("/actions/purge", data=form, headers=BROWSER)
        refusal = await wrong.text()
        form["confirm"] = "2"
        right = await c.post("/actions/purge", data=form, headers=BROWSER, allow_redirects=False)
    assert wrong.status == 400 and "type the number" in refusal
    assert right.status == 303 and len(jobs.jobs) == 1


async def test_replay_of_a_reason_a_retry_cannot_fix_is_refused() -> None:
    """Replaying schema failures is refused unless forced, as the CLI does."""
    async with client(sample()) as (c, jobs):
        form = {"scope": "group", "reason": "schema"}
        answer = await c.post("/actions/replay", data=form, headers=BROWSER)
    assert answer.status == 400 and not jobs.jobs


async def test_selected_counts_only_what_is_in_the_snapshot() -> None:
    """A selection keeps the fingerprints the snapshot holds and drops unknown ones."""
    letters = sample()
    async with client(letters) as (c, jobs):
        form = [("scope", "selected"), ("fp", letters[0].fingerprint), ("fp", "f" * 64)]
        form.append(("confirm", "1"))
        answer = await c.post("/actions/purge", data=form, headers=BROWSER, allow_redirects=False)
    assert answer.status == 303
    assert jobs.jobs[1].selection.fingerprints == {letters[0].fingerprint: 1}


async def test_cross_site_post_is_forbidden() -> None:
    """A form posted from another site gets 403, whatever it asks for."""
    async with client(sample()) as (c, jobs):
        form = {"scope": "group", "reason": "schema", "confirm": "2"}
        answer = await c.post("/actions/purge", data=form, headers={"Sec-Fetch-Site": "cross-site"})
    assert answer.status == 403 and not jobs.jobs


async def test_post_without_browser_header_needs_the_token() -> None:
    """curl without the token gets 403; with it as a bearer token the action starts."""
    form = {"scope": "group", "reason": "schema", "confirm": "2"}
    async with client(sample(), token="s3cret") as (c, jobs):
        bare = await c.post("/actions/purge", data=form)
        auth = {"Authorization": "Bearer s3cret"}
        ok = await c.post("/actions/purge", data=form, headers=auth, allow_redirects=False)
    assert bare.status == 403 and ok.status == 303 and len(jobs.jobs) == 1


async def test_read_only_hides_actions_and_answers_405() -> None:
    """Under --read-only no page has an action and every action answers 405."""
    async with client(sample(), read_only=True) as (c, jobs):
        page = await (await c.get("/dlq")).text()
        form = {"scope": "group", "reason": "schema", "confirm": "2"}
        answer = await c.post("/actions/purge", data=form, headers=BROWSER)
    assert "Purge" not in page and "Replay" not in page and "<form" not in page
    assert answer.status == 405 and not jobs.jobs


async def test_with_a_token_pages_need_the_login() -> None:
    """With console.token set a visitor is sent to log in; the right token sets a cookie."""
    async with client(sample(), token="s3cret") as (c, _):
        anonymous = await c.get("/dlq", allow_redirects=False)
        wrong = await c.post("/login", data={"token": "nope"}, headers=BROWSER)
        right = await c.post(
            "/login", data={"token": "s3cret"}, headers=BROWSER, allow_redirects=False
        )
        after = await c.get("/dlq")
    assert anonymous.status == 303 and anonymous.headers["Location"] == "/login"
    assert wrong.status == 403
    assert right.status == 303 and "s3cret" not in right.headers["Set-Cookie"]
    assert after.status == 200


async def test_a_second_action_while_one_runs_is_refused() -> None:
    """One action holds the DLQ at a time; another gets 409."""
    async with client(sample()) as (c, jobs):
        jobs.busy = True
        form = {"scope": "group", "reason": "rejected_by_sink"}
        answer = await c.post("/actions/replay", data=form, headers=BROWSER)
    assert answer.status == 409


async def test_overview_and_static_assets_are_served() -> None:
    """The overview and its fragment render; the script and styles come from the package."""
    async with client(sample()) as (c, _):
        statuses = [(await c.get(p)).status for p in ("/", "/overview", "/static/console.js")]
        css = await c.get("/static/console.css")
    assert statuses == [200, 200, 200] and css.status == 200


def test_every_asset_ships_in_the_wheel() -> None:
    """Each template, script and stylesheet matches pyproject's package-data for the console."""
    root = Path(__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["worker.console"]
    package = root / "worker" / "console"
    found = [p for d in ("templates", "static") for p in (package / d).iterdir()]
    assets = [p.relative_to(package).as_posix() for p in found]
    assert assets and all(any(fnmatch.fnmatch(a, g) for g in globs) for a in assets)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "[::1]", "localhost"])
def test_loopback_binds_without_a_token(host: str) -> None:
    """The console listens on loopback without further ado."""
    assert bind_refusal(host, None, insecure=False) is None


def test_other_addresses_need_a_token_or_insecure() -> None:
    """Any other address is refused unless a token is set or --insecure is given."""
    assert "console.token" in (bind_refusal("0.0.0.0", None, insecure=False) or "")
    assert bind_refusal("0.0.0.0", SecretStr("s3cret"), insecure=False) is None
    assert bind_refusal("10.1.2.3", None, insecure=True) is None
