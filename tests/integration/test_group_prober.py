"""The ntp_group prober against real chronyd servers (``-x``, loopback, own ports) and an
in-process fake server that is a second ahead."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ntp_probe.config.schema import Config, Module, NTPGroupSettings, NTPSettings
from ntp_probe.engine.registry import resolve_target
from ntp_probe.engine.result import Reason
from ntp_probe.engine.runner import guard_for, run_probe
from tests.behaviour.fake_server import FakeNTPServer, answer
from tests.conftest import Chronyd, label_sets, value

pytestmark = pytest.mark.integration

MODULE = Module(
    name="group", prober="ntp_group", timeout=3.0,
    ntp=NTPSettings(samples=3, sample_interval=0.05, reply_timeout=0.5,
                    preferred_ip_protocol="ip4"),
    ntp_group=NTPGroupSettings(max_falsetickers=0),
)


async def test_real_chronyds_outvote_a_fake_falseticker(
    chronyd: Chronyd, chronyd_factory: Callable[..., Chronyd]
) -> None:
    honest = [chronyd, chronyd_factory(synchronised=True), chronyd_factory(synchronised=True)]
    fake = await FakeNTPServer.start(answer(offset=1.0))
    try:
        members = [c.target for c in honest] + [fake.target]
        config = Config(modules={"group": MODULE}, source="test",
                        groups={"lab": tuple(members)})
        target = resolve_target(config, MODULE, "lab")
        m, log = await run_probe(target, MODULE, MODULE.timeout,
                                 guard=guard_for(config, MODULE))
    finally:
        fake.close()
    states = {s["member"]: s["state"]
              for s in label_sets(m, "probe_ntp_group_member_selection_info")}
    assert states == {**{c.target: "truechimer" for c in honest}, fake.target: "falseticker"}, \
        log.text()
    assert m.failure is Reason.FALSETICKERS
    # chronyd -x serves this host's own clock: the consensus is the local clock.
    offset = value(m, "probe_ntp_group_local_clock_offset_seconds")
    assert offset is not None and abs(offset) < 0.005
    for c in honest:
        assert value(m, "probe_ntp_group_member_up", member=c.target) == 1
    assert fake.requests, "the fake member was probed too"


async def test_an_unsynchronised_chronyd_is_unfit(
    chronyd: Chronyd, chronyd_factory: Callable[..., Chronyd]
) -> None:
    unsynchronised = chronyd_factory(synchronised=False)
    second = chronyd_factory(synchronised=True)
    config = Config(modules={"group": MODULE}, source="test")
    target = resolve_target(config, MODULE,
                            f"{chronyd.target},{second.target},{unsynchronised.target}")
    m, log = await run_probe(target, MODULE, MODULE.timeout, guard=guard_for(config, MODULE))
    states = {s["member"]: s["state"]
              for s in label_sets(m, "probe_ntp_group_member_selection_info")}
    assert states[unsynchronised.target] == "unfit", log.text()
    assert m.success, log.text()
    assert value(m, "probe_ntp_group_truechimers") == 2
