"""Basic auth under attack: long passwords, malformed hashes, floods of wrong passwords,
and unknown users that must cost what known ones cost."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from ntp_probe.web import auth
from ntp_probe.web.app import create_app
from ntp_probe.web.auth import WebConfigError, load_web_config
from tests.behaviour.test_operate_web import poll
from tests.behaviour.test_web import make_state

Client = TestClient[web.Request, web.Application]
USER, PASSWORD = "alice", "s3cret"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def count_bcrypt_checks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The passwords bcrypt checks from now on, in order."""
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counted(password: bytes, hashed_password: bytes) -> bool:
        checks.append(password)
        return real(password, hashed_password)

    monkeypatch.setattr(bcrypt, "checkpw", counted)
    return checks


def alice_and_carol(tmp_path: Path, alice_rounds: int) -> auth.WebConfig:
    """A web config of alice (PASSWORD, at bcrypt cost ``alice_rounds``) and carol
    ("carols", cost 4)."""
    slow = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=alice_rounds)).decode()
    quick = bcrypt.hashpw(b"carols", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  {USER}: '{slow}'\n  carol: '{quick}'\n")
    return load_web_config(str(path))


async def cancel_all(tasks: list[asyncio.Task[bool]]) -> None:
    """Cancel a flood's checks still waiting, and wait for them to end."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def web_config_file(tmp_path: Path, hashed: str) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  {USER}: '{hashed}'\n")
    return path


async def client_with(aiohttp_client: AiohttpClient, tmp_path: Path, rounds: int) -> Client:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=rounds)).decode()
    state = make_state()
    state.web_config = load_web_config(str(web_config_file(tmp_path, hashed)))
    return await aiohttp_client(create_app(state))


async def test_a_password_over_72_bytes_is_refused_not_an_error(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await client_with(aiohttp_client, tmp_path, rounds=4)
    for user in (USER, "mallory"):
        resp = await client.get("/metrics", headers=basic(user, "x" * 73))
        assert resp.status == 401, await resp.text()
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    ok = await client.get("/metrics", headers=basic(USER, PASSWORD))
    assert ok.status == 200


def test_a_malformed_hash_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match=f"basic_auth_users.{USER}: not a valid bcrypt"):
        load_web_config(str(web_config_file(tmp_path, "$2y$10$abc")))


def test_unknown_users_are_checked_at_the_configured_cost(tmp_path: Path) -> None:
    for rounds in (4, 6):
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=rounds)).decode()
        config = load_web_config(str(web_config_file(tmp_path, hashed)))
        assert auth._cost(config._dummy) == rounds


async def test_a_flood_of_wrong_passwords_is_turned_away_at_once(
    aiohttp_client: AiohttpClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checks queue (as exporter-toolkit's do) only as long as their answers would come
    # within MAX_CHECK_WAIT; here (a tiny wait) the minimum queue, then 429 at once.
    monkeypatch.setattr(auth, "MAX_CHECK_WAIT", 0.001)
    client = await client_with(aiohttp_client, tmp_path, rounds=8)
    flood = auth.MIN_PENDING_CHECKS * 4
    responses = await asyncio.gather(
        *(client.get("/metrics", headers=basic(USER, f"wrong{i}")) for i in range(flood)))
    statuses = [r.status for r in responses]
    assert set(statuses) == {401, 429}
    assert statuses.count(401) >= auth.MIN_PENDING_CHECKS
    busy = next(r for r in responses if r.status == 429)
    assert busy.headers["Retry-After"] == "1"
    assert busy.headers["X-Content-Type-Options"] == "nosniff"
    # The right password still works once the flood has drained.
    assert (await client.get("/metrics", headers=basic(USER, PASSWORD))).status == 200


async def test_a_cheap_users_check_does_not_shorten_an_expensive_ones_estimate(
        tmp_path: Path) -> None:
    # Each hash's check is estimated at its own bcrypt cost: one quick login of a cost-4
    # user must not make the queue for a cost-12 user look 250 times shorter than it is.
    cheap = bcrypt.hashpw(b"a", bcrypt.gensalt(rounds=4)).decode()
    dear = bcrypt.hashpw(b"b", bcrypt.gensalt(rounds=12)).decode()
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  a: '{cheap}'\n  b: '{dear}'\n")
    config = load_web_config(str(path))
    assert set(config.cost_seconds) == {12}  # measured at load, the highest cost
    assert not await config.authorized(basic("a", "wrong")["Authorization"])
    assert set(config.cost_seconds) == {4, 12}
    assert config.estimate(12) > 50 * config.estimate(4)
    assert config.estimate(10) == pytest.approx(config.estimate(12) / 4)


async def test_a_password_check_that_ends_after_a_rotation_vouches_for_nothing(
        tmp_path: Path) -> None:
    # A reload changes alice's password while her first (slow) check runs: that check
    # may let its own request in, but must not make the old password good from then on.
    old = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode()
    config = load_web_config(str(web_config_file(tmp_path, old)))
    header = basic(USER, PASSWORD)["Authorization"]
    checking = asyncio.create_task(config.authorized(header))
    await poll(lambda: sum(config._pending.values()) == 1, "the check in its thread")
    new = bcrypt.hashpw(b"rotated", bcrypt.gensalt(rounds=4)).decode()
    rotated = load_web_config(str(web_config_file(tmp_path, new)))
    assert config.restart_needed(rotated) == []
    config.adopt(rotated)
    await checking
    assert not await config.authorized(header)
    assert await config.authorized(basic(USER, "rotated")["Authorization"])


async def test_a_wrong_password_costs_one_bcrypt_however_often_it_comes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As exporter-toolkit caches both outcomes: a Prometheus scraping many targets with a
    # password rotated away costs one check, not one per scrape.
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = load_web_config(str(web_config_file(tmp_path, hashed)))
    checks = count_bcrypt_checks(monkeypatch)
    for _ in range(5):
        assert not await config.authorized(basic(USER, "stale")["Authorization"])
        assert not await config.authorized(basic("mallory", "stale")["Authorization"])
        assert await config.authorized(basic(USER, PASSWORD)["Authorization"])
    assert sorted(checks) == [PASSWORD.encode(), b"stale", b"stale"]


async def test_a_flood_does_not_lock_out_a_first_login(tmp_path: Path) -> None:
    # Forty connections sending wrong passwords held every check slot: a login not cached
    # yet (a Prometheus after a restart) got 429 for as long as the flood lasted. Checks
    # now queue, as exporter-toolkit's do, and made-up user names have their own thread.
    config = alice_and_carol(tmp_path, alice_rounds=9)
    flood = [asyncio.create_task(config.authorized(basic(name, f"wrong{i}")["Authorization"]))
             for i in range(40) for name in (USER, f"madeup{i}")]
    try:
        await poll(lambda: sum(config._pending.values()) > 40, "the flood queued")
        assert await config.authorized(basic("carol", "carols")["Authorization"])
        assert await config.authorized(basic(USER, PASSWORD)["Authorization"])
    finally:
        await cancel_all(flood)


async def test_a_flood_of_wrong_passwords_cannot_push_a_good_login_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Failures are remembered apart from successes: more distinct wrong passwords than the
    # memory holds leave the good login remembered (no bcrypt, no queue behind the flood).
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = load_web_config(str(web_config_file(tmp_path, hashed)))
    good = basic(USER, PASSWORD)["Authorization"]
    assert await config.authorized(good)
    for i in range(1100):
        assert not await config.authorized(basic(USER, f"wrong{i}")["Authorization"])
    checks = count_bcrypt_checks(monkeypatch)
    assert await config.authorized(good)
    assert checks == []


async def test_a_sustained_flood_naming_one_user_leaves_another_a_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The flood keeps its own lane full (here: a tiny wait allowed, so 8 checks): more of
    # it gets 429 at once, while another configured user's first login still queues.
    monkeypatch.setattr(auth, "MAX_CHECK_WAIT", 0.001)
    config = alice_and_carol(tmp_path, alice_rounds=10)
    flood = [asyncio.create_task(config.authorized(basic(USER, f"wrong{i}")["Authorization"]))
             for i in range(auth.MIN_PENDING_CHECKS)]
    try:
        await poll(lambda: config._pending.get(USER) == auth.MIN_PENDING_CHECKS,
                   "alice's lane full")
        with pytest.raises(auth.TooBusy):
            await config.authorized(basic(USER, "one more")["Authorization"])
        assert await config.authorized(basic("carol", "carols")["Authorization"])
    finally:
        await cancel_all(flood)


async def test_floods_naming_several_users_delay_another_by_a_check_per_lane(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every configured user's lane feeds the same two threads: served first come, first
    # served, carol's first login waited behind every flooded lane's checks (24 s with
    # five). The threads now take one check from each lane in turn.
    users = [f"u{i}" for i in range(5)]
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=6)).decode()
    quick = bcrypt.hashpw(b"carols", bcrypt.gensalt(rounds=6)).decode()
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n" + "".join(f"  {u}: '{hashed}'\n" for u in users)
                    + f"  carol: '{quick}'\n")
    config = load_web_config(str(path))
    checks = count_bcrypt_checks(monkeypatch)
    flood = [asyncio.create_task(config.authorized(basic(u, f"wrong{i}")["Authorization"]))
             for i in range(8) for u in users]
    await asyncio.sleep(0)  # every flood check is queued (none has a thread's answer yet)
    assert await config.authorized(basic("carol", "carols")["Authorization"])
    await asyncio.gather(*flood)
    # Two checks were running, then one from each of the five lanes, then carol's.
    assert checks.index(b"carols") <= 2 + len(users), checks
