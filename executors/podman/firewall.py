"""Keeps the host firewall around the runs' network in place, with ``nft``.

The rules themselves are :func:`policies.podman_firewall.isolation_ruleset` (why they are
what they are is said there); this module only applies them. :class:`RunsFirewall` is
asked before every run that joins the network, and applies the ruleset when it has not
yet done so in this process or when the run names a proxy port it has not allowed yet:
each apply is one ``nft -f -`` transaction, so the host never sees half a ruleset, and
applying it again changes nothing. When the node stops, :meth:`RunsFirewall.release`
takes its proxy ports out and leaves the tables: its runs keep running, and stay fenced
in (with nothing to reach until the node is back).

Whether the kernel can match bridge ports by name (``meta ibrname``, module
``nft_meta_bridge``) is a fact about the host, learnt once when the executor opens
(:meth:`RunsFirewall.learn_host`, a check-only ``nft -c`` that changes nothing) and said in
its one start-up line; the rules then match run-to-run traffic by the runs' subnet instead.
Where the check could not tell, the first apply finds out and falls back the same way.

An ``nft`` that is missing or may not change the firewall (not root, no CAP_NET_ADMIN)
raises :class:`~executors.base.ExecutorError` naming the setting and both ways out; the
executor fails that run's start with it (``start-failed``) and keeps serving. Nothing
here skips the firewall silently.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from typing import NamedTuple

from common.logging import get_logger
from executors.base import ExecutorError
from policies.podman_firewall import (
    database_access_ruleset,
    isolation_ruleset,
    release_ruleset,
    removal_ruleset,
    table_name,
)

log = get_logger(__name__)

#: Where ``nft`` is looked for: the PATH first, then where Debian puts it (``/usr/sbin`` is
#: not on every user's PATH).
NFT_COMMANDS = ("nft", "/usr/sbin/nft", "/sbin/nft")


class RunNetwork(NamedTuple):
    """The runs' network as podman made it: its bridge, subnet and gateway."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address


class NftResult(NamedTuple):
    returncode: int
    stderr: str


#: A check-only ruleset naming ``meta ibrname``: the kernel refuses it without
#: ``nft_meta_bridge``. ``nft -c`` sends it to the kernel and commits nothing.
BRIDGE_META_PROBE = """table bridge fednode-probe {
  chain forward {
    meta ibrname "fednode-probe" accept
  }
}
"""


async def run_nft(
    script: str,
    *,
    seconds: float,
    commands: tuple[str, ...] = NFT_COMMANDS,
    check_only: bool = False,
) -> NftResult:
    """Run ``nft -f -`` (``nft -c -f -`` with ``check_only``) with ``script`` on its stdin,
    for at most ``seconds``; ``FileNotFoundError`` when there is no nft."""
    for command in commands:
        try:
            process = await asyncio.create_subprocess_exec(
                command,
                *(("-c",) if check_only else ()),
                "-f",
                "-",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            continue
        try:
            async with asyncio.timeout(seconds):
                _, stderr = await process.communicate(script.encode())
        except TimeoutError:
            return NftResult(-1, f"nft did not answer within {seconds:g} s")
        finally:
            if process.returncode is None:  # timed out, or the caller was cancelled
                process.kill()
                await process.wait()
        return NftResult(process.returncode or 0, stderr.decode(errors="replace").strip())
    raise FileNotFoundError("nft")


class RunsFirewall:
    """The nftables isolation of one runs' network, applied as runs need it."""

    def __init__(self, *, seconds: float, commands: tuple[str, ...] = NFT_COMMANDS) -> None:
        self._seconds = seconds
        self._commands = commands
        self._lock = asyncio.Lock()
        #: What the last successful apply was for: the network and the ports it allowed.
        self._applied: tuple[RunNetwork, frozenset[int]] | None = None
        self._bridge_by_name = True

    async def learn_host(self) -> bool | None:
        """Whether this kernel matches bridge ports by name (``nft_meta_bridge``); ``None``
        when nft cannot tell (missing, not permitted: the first apply says why). Learnt
        once, so that the rules fit the host before the first run, without a retry."""
        try:
            result = await run_nft(
                BRIDGE_META_PROBE,
                seconds=self._seconds,
                commands=self._commands,
                check_only=True,
            )
        except FileNotFoundError:
            return None
        if result.returncode == 0:
            return True
        if _no_bridge_meta(result):
            self._bridge_by_name = False
            return False
        return None

    async def allow(
        self, network: RunNetwork, *, proxy_port: int, peer_ports: tuple[int, ...] = ()
    ) -> None:
        """Make sure runs on ``network`` reach ``proxy_port`` (and the node's peer
        forwarders, ``peer_ports``) on its gateway and nothing else; :class:`ExecutorError`
        says why it cannot be made to (for the run)."""
        wanted = frozenset({proxy_port, *peer_ports})
        async with self._lock:  # concurrent starts share one apply
            applied = self._applied
            if applied is not None and applied[0] == network and wanted <= applied[1]:
                return
            ports = wanted | (
                applied[1] if applied is not None and applied[0] == network else frozenset()
            )
            await self._apply(network, ports)
            self._applied = (network, ports)
            log.info(
                "podman.firewall.applied",
                network=network.name,
                table=table_name(network.name),
                bridge=network.bridge,
                gateway=str(network.gateway),
                proxy_ports=sorted(ports),
                bridge_by_name=self._bridge_by_name,
            )

    async def admit(
        self,
        network: RunNetwork,
        *,
        address: str,
        relay_ports: frozenset[int],
        allowed_ports: frozenset[int],
    ) -> None:
        """Let the run at ``address`` reach ``allowed_ports`` of the database ``relay_ports``
        and no other (empty: none); :class:`ExecutorError` when nft refuses."""
        if not relay_ports:
            return
        script = database_access_ruleset(
            network.name, address=address, relay_ports=relay_ports, allowed_ports=allowed_ports
        )
        async with self._lock:
            try:
                result = await run_nft(script, seconds=self._seconds, commands=self._commands)
            except FileNotFoundError:
                result = NftResult(-1, "nft is not installed")
        if result.returncode != 0:
            raise ExecutorError(
                f"nft refused the database access of run address {address} on podman "
                f"network {network.name}: {_first_line(result.stderr)}"
            )
        log.info(
            "podman.firewall.databases",
            network=network.name,
            address=address,
            relay_ports=sorted(allowed_ports),
        )

    async def release(self) -> None:
        """Take the proxy ports this firewall allowed out of the set; the rules stay.

        For taking a node down for good; not called on close, since runs that keep going
        while the node restarts need its port again when it is back.

        A proxy's port is its own (two cannot listen on one gateway port), so no other
        node's door closes. Failures are logged: the node is stopping either way.
        """
        async with self._lock:
            applied, self._applied = self._applied, None
            if applied is None:
                return
            network, ports = applied
            try:
                result = await run_nft(
                    release_ruleset(network.name, ports),
                    seconds=self._seconds,
                    commands=self._commands,
                )
            except FileNotFoundError:
                result = NftResult(-1, "nft is gone")
            if result.returncode == 0:
                log.info(
                    "podman.firewall.released", network=network.name, proxy_ports=sorted(ports)
                )
            else:
                log.warning(
                    "podman.firewall.release_failed",
                    network=network.name,
                    proxy_ports=sorted(ports),
                    error=_first_line(result.stderr),
                )

    async def _apply(self, network: RunNetwork, ports: frozenset[int]) -> None:
        try:
            result = await self._run(network, ports)
            if result.returncode != 0 and self._bridge_by_name and _no_bridge_meta(result):
                # A fact about the host that learn_host could not establish: said once.
                log.info(
                    "podman.firewall.no_bridge_meta",
                    network=network.name,
                    detail="kernel lacks nft_meta_bridge; run-to-run IPv4 matched by subnet",
                )
                self._bridge_by_name = False
                result = await self._run(network, ports)
        except FileNotFoundError:
            raise ExecutorError(
                f"executor.firewall is nftables, but the nft command is not installed, so "
                f"runs on podman network {network.name} cannot be fenced in: install "
                f"nftables (scripts/podman-setup does), or set executor.firewall: off "
                f"and accept that runs can reach each other and this host's services"
            ) from None
        if result.returncode == 0:
            return
        if "Operation not permitted" in result.stderr or "Permission denied" in result.stderr:
            raise ExecutorError(
                f"executor.firewall is nftables, but nft may not change this host's "
                f"firewall ({_first_line(result.stderr)}): run the node as root or with "
                f"CAP_NET_ADMIN, or set executor.firewall: off and accept that runs on "
                f"podman network {network.name} can reach each other and this host's services"
            )
        raise ExecutorError(
            f"nft refused the firewall of podman network {network.name} "
            f"(executor.firewall: nftables): {_first_line(result.stderr)}"
        )

    async def _run(self, network: RunNetwork, ports: frozenset[int]) -> NftResult:
        script = isolation_ruleset(
            network=network.name,
            bridge=network.bridge,
            subnet=network.subnet,
            gateway=network.gateway,
            proxy_ports=ports,
            bridge_by_name=self._bridge_by_name,
            node_uid=os.getuid(),
        )
        return await run_nft(script, seconds=self._seconds, commands=self._commands)


async def remove_firewall(
    network: str, *, seconds: float, commands: tuple[str, ...] = NFT_COMMANDS
) -> None:
    """Remove the tables of ``network``, if there are any (``firewall: off``).

    Tables an earlier ``nftables`` node left would otherwise keep dropping the runs'
    traffic to a proxy whose port that node took out when it stopped. Without nft there
    can be no tables to remove; a refusal is logged (the runs then cannot reach the proxy,
    and the log says why).
    """
    try:
        result = await run_nft(removal_ruleset(network), seconds=seconds, commands=commands)
    except FileNotFoundError:
        return
    if result.returncode != 0:
        log.warning(
            "podman.firewall.remove_failed", network=network, error=_first_line(result.stderr)
        )


def _no_bridge_meta(result: NftResult) -> bool:
    return "ibrname" in result.stderr and "not supported" in result.stderr.lower()


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else "no message"
