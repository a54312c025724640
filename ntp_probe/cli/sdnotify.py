"""systemd's notify protocol (Type=notify, WatchdogSec) without libsystemd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

logger = logging.getLogger("ntp_probe.sdnotify")


def notify(message: str) -> bool:
    """Send one datagram to $NOTIFY_SOCKET; False when unset or unreachable."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.warning("sd_notify to %s failed: %s", path, exc.strerror or exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC in seconds when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6


async def watchdog_loop(interval: float) -> None:
    """Ping the watchdog from the event loop: a stuck loop stops the pings."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def start_watchdog() -> asyncio.Task[None] | None:
    """Start pinging if systemd asked for it; the caller cancels the task on shutdown."""
    interval = watchdog_interval()
    if interval is None:
        return None
    return asyncio.get_running_loop().create_task(watchdog_loop(interval))


async def stop_watchdog(task: asyncio.Task[None] | None) -> None:
    """Cancel a task from :func:`start_watchdog`."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
