"""BMC drivers: Redfish through sushy, IPMI through pyghmi.

One narrow interface (:class:`Driver`) between the power worker and a BMC:
power on, off, reset, cycle, the power state, a one-time boot device.  A
driver is opened for one request and closed after it (:func:`open_driver`);
every call may raise anything, and the worker turns it into a
:class:`bootsvc.power.errors.BmcError` with :func:`~bootsvc.power.errors.classify`.

Each call is bounded by the library's own timeouts (sushy: connect and read
timeouts, no server-side retries: the worker retries with back-off; pyghmi:
its session timeout) and, above that, by the worker's deadline: a call
that outlives it is abandoned on its thread.

Idempotent where the BMC allows: ``on`` of a machine that is on, and ``off``
of one that is off, send nothing.  ``cycle`` of a machine that is off powers
it on (an approval must start a machine whatever state it is in).
"""

from __future__ import annotations

from typing import Any, Protocol

from bootsvc.power.errors import BmcError
from lpmos.power import BmcRecord


class Driver(Protocol):
    def power_state(self) -> str:
        """``on``, ``off``, or the BMC's own word for anything else."""

    def power_on(self) -> None: ...

    def power_off(self) -> None:
        """Hard off (the machine's OS is not asked)."""

    def reset(self) -> None:
        """Hard reset of a machine that is on."""

    def power_cycle(self) -> None:
        """Off then on for a machine that is on; on for one that is off."""

    def set_boot_device(self, device: str, once: bool) -> None:
        """``device``: ``pxe`` or ``disk``."""

    def boot_override(self) -> str:
        """The boot device the BMC says is set ("" when it cannot say)."""

    def close(self) -> None: ...


class RedfishDriver:
    """A ComputerSystem through sushy: the one in ``options.system``, else
    the only member of ``/redfish/v1/Systems``."""

    def __init__(self, record: BmcRecord, password: str, timeout: float) -> None:
        import sushy
        from sushy import auth

        self._sushy = sushy
        self._endpoint = record.endpoint()
        verify = bool(record.options.get("verify_tls", True))
        self._conn = sushy.Sushy(
            record.endpoint() + "/redfish/v1/",
            auth=auth.BasicAuth(username=record.user, password=password),
            verify=verify, read_timeout=max(1, int(timeout)),
            connect_timeout=max(1, min(5, int(timeout))),
            # 1, not 0: sushy reads 0 as "3 connection tries 2 s apart"; the
            # worker does the retrying, with back-off, within its deadline
            server_side_retries=1, server_side_retries_delay=0)
        system = record.options.get("system")
        if not system:
            members = sorted(self._conn.get_system_collection().members_identities)
            if len(members) != 1:
                raise BmcError("config", f"BMC at {record.endpoint()} has {len(members)} "
                                         "systems; set options.system to the one of this "
                                         f"machine ({', '.join(members[:4]) or 'none'})")
            system = members[0]
        self._system: Any = self._conn.get_system(system)

    def _refresh(self) -> Any:
        self._system.refresh(force=True)
        return self._system

    def _unexpected(self, what: str) -> BmcError:
        return BmcError("protocol", f"BMC at {self._endpoint} sent an unexpected Redfish "
                                    f"reply: {what}")

    def power_state(self) -> str:
        state = self._refresh().power_state
        if state is None:      # sushy reads a value outside the schema as None
            raw = (self._system.json or {}).get("PowerState")
            raise self._unexpected("the ComputerSystem has no PowerState" if raw is None else
                                   f"PowerState {str(raw)[:40]!r} is none of On, Off, "
                                   "PoweringOn, PoweringOff")
        value = str(getattr(state, "value", state)).lower()
        return {"poweringon": "on", "poweringoff": "off"}.get(value, value)

    def _reset(self, kind: Any) -> None:
        allowed = self._system.get_allowed_reset_system_values()
        if allowed and kind not in allowed:
            names = ", ".join(sorted(str(getattr(a, "value", a)) for a in allowed))
            raise BmcError("unsupported", f"BMC at {self._endpoint} does not offer ResetType "
                                          f"{getattr(kind, 'value', kind)} (it offers {names})")
        self._system.reset_system(kind)

    def power_on(self) -> None:
        if self.power_state() != "on":
            self._reset(self._sushy.RESET_ON)

    def power_off(self) -> None:
        if self.power_state() != "off":
            self._reset(self._sushy.RESET_FORCE_OFF)

    def reset(self) -> None:
        if self.power_state() == "off":
            raise BmcError("unsupported", "the machine is off; a reset needs it on (ask for "
                                          "'cycle' or 'on')")
        self._reset(self._sushy.RESET_FORCE_RESTART)

    def power_cycle(self) -> None:
        if self.power_state() == "off":
            self._reset(self._sushy.RESET_ON)
            return
        allowed = self._system.get_allowed_reset_system_values()
        cycle = getattr(self._sushy, "RESET_POWER_CYCLE", None)
        self._reset(cycle if cycle is not None and cycle in allowed
                    else self._sushy.RESET_FORCE_RESTART)

    def set_boot_device(self, device: str, once: bool) -> None:
        s = self._sushy
        target = {"pxe": s.BOOT_SOURCE_TARGET_PXE, "disk": s.BOOT_SOURCE_TARGET_HDD}[device]
        if not isinstance((self._refresh().json or {}).get("Boot"), dict):
            raise self._unexpected("the ComputerSystem has no Boot object, so no boot "
                                   "override can be set")
        allowed = self._system.get_allowed_system_boot_source_values()
        if allowed and target not in allowed:
            raise BmcError("unsupported", f"BMC at {self._endpoint} cannot boot from {device} "
                                          "(it offers "
                           + ", ".join(sorted(str(getattr(a, "value", a)) for a in allowed))
                           + ")")
        self._system.set_system_boot_options(
            target, enabled=s.BOOT_SOURCE_ENABLED_ONCE if once
            else s.BOOT_SOURCE_ENABLED_CONTINUOUS)

    def boot_override(self) -> str:
        boot = self._refresh().boot
        target = getattr(boot, "target", None)
        return str(getattr(target, "value", target or ""))

    def close(self) -> None:
        self._conn.close()


class IpmiDriver:
    """IPMI 2.0 (RMCP+) through pyghmi, one session per request."""

    def __init__(self, record: BmcRecord, password: str, timeout: float) -> None:
        from pyghmi.ipmi import command

        self._wait = max(1, min(30, int(timeout)))
        self._cmd: Any = command.Command(bmc=record.address, userid=record.user,
                                         password=password, port=record.effective_port,
                                         keepalive=False)

    def power_state(self) -> str:
        return str(self._cmd.get_power().get("powerstate", "unknown"))

    def power_on(self) -> None:
        if self.power_state() != "on":
            self._cmd.set_power("on", wait=self._wait)

    def power_off(self) -> None:
        if self.power_state() != "off":
            self._cmd.set_power("off", wait=self._wait)

    def reset(self) -> None:
        if self.power_state() == "off":
            raise BmcError("unsupported", "the machine is off; a reset needs it on (ask for "
                                          "'cycle' or 'on')")
        self._cmd.set_power("reset")

    def power_cycle(self) -> None:
        # 'boot': on when off, else a hard reset (chassis control 3)
        self._cmd.set_power("boot")

    def set_boot_device(self, device: str, once: bool) -> None:
        self._cmd.set_bootdev({"pxe": "network", "disk": "hd"}[device], persist=not once)

    def boot_override(self) -> str:
        dev = self._cmd.get_bootdev()
        return str(dev.get("bootdev", "")) if isinstance(dev, dict) else ""

    def close(self) -> None:
        """Log out, and make pyghmi forget the session.  pyghmi shares one
        session per (BMC, user, password) across Commands and leaves a
        logged-in session in ``Session.initting_sessions``, so the next
        Command to the same BMC would get this logged-out session back and
        fail (``'<' not supported between float and NoneType``), or, not
        logged out, hang; seen with pyghmi 1.6.19 against virtualbmc."""
        session = getattr(self._cmd, "ipmi_session", None)
        if session is None:
            return
        try:
            session.logout()
        except Exception:      # noqa: S110 - a session we are dropping anyway
            pass
        from pyghmi.ipmi.private import session as ipmi_session

        cls: Any = ipmi_session.Session
        for key, value in list(cls.initting_sessions.items()):
            if value is session:
                cls.initting_sessions.pop(key, None)
        for ports in list(cls.bmc_handlers.values()):
            for port, value in list(ports.items()):
                if value is session:
                    ports.pop(port, None)


def open_driver(record: BmcRecord, password: str, timeout: float) -> Driver:
    """A driver connected to ``record``'s BMC (this talks to the BMC)."""
    if record.driver == "redfish":
        return RedfishDriver(record, password, timeout)
    if record.driver == "ipmi":
        return IpmiDriver(record, password, timeout)
    raise BmcError("config", f"unknown BMC driver {record.driver!r}")
