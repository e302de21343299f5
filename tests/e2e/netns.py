"""Several hosts on one machine, made of Linux network namespaces joined by veth pairs to a bridge.

Each host is a namespace with its own loopback and one interface `eth0` holding an address of a private
/24; the other end of each veth pair sits in a switch namespace on a bridge. Nothing is created in the
machine's own namespace: every interface is made inside the namespaces this module creates
(`ip -n NS link add ... peer ... netns SWITCH`), and deleting the namespaces removes them all.
A host is cut off by taking its switch port down (`cut`), as a pulled cable would.

Needs root and iproute2's `ip` (`skip_reason` says what is missing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def skip_reason() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"qprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as e:
        return f"cannot create a network namespace: {e}"
    try:  # the kernel must offer what Hosts uses: a bridge and veth pairs
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
    except RuntimeError as e:
        return f"cannot create a bridge or veth pair in a namespace: {e}"
    finally:
        _ip("netns", "del", probe)
    return None


@dataclass
class Hosts:
    """Namespaces `names` on subnet 10.X.Y.0/24 (host i gets .i+1), plus a switch namespace."""

    names: Sequence[str]
    subnet: str = "10.231.7"
    tag: str = field(default_factory=lambda: f"q{os.getpid() % 100000}")
    created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{list(self.names).index(host) + 1}"

    def port_of(self, host: str) -> str:
        return f"p{list(self.names).index(host)}"  # the host's port on the switch

    def up(self) -> Hosts:
        _ip("netns", "add", self.switch)
        self.created.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.names:
            ns = self.ns(host)
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", self.port_of(host), "netns", self.switch)
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.switch, "link", "set", self.port_of(host), "master", "br0")
            _ip("-n", self.switch, "link", "set", self.port_of(host), "up")
        return self

    def down(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()

    def cut(self, host: str) -> None:
        """Take the host's switch port down: its packets go nowhere, its connections hang."""
        _ip("-n", self.switch, "link", "set", self.port_of(host), "down")

    def mend(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self.port_of(host), "up")

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside the host's namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], **kwargs)

    def __enter__(self) -> Hosts:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()
