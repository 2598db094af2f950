"""The `shape` stage's engine side: tc shaping (delay, rate, limit) as a transaction that reverts itself.

iptables-apply's idea. Before the qdisc changes, a detached guard is armed on the host. Unless a fresh
command confirms the change within `confirm_within` seconds, the guard deletes the qdisc. After a confirm it
stays armed and deletes it at `revert_after` anyway. So a SIGKILLed engine, or a link that shaping itself cut,
never leaves a host shaped past the deadline. `revert` deletes the qdisc and kills the guard; `revert_stale`
does the same for what a crashed engine left (what `--resume` calls first).

Deletions compare and delete: the qdisc gets a handle made from the transaction's token, and
`tc qdisc del dev IF root handle H:` removes only that qdisc. The kernel refuses if the root qdisc has another
handle. A late guard therefore never removes shaping that someone else applied afterwards.

State on the host: `~/.cache/benchfleet/shape/<run_id>/<IF>/` holds `state` (what was applied), `guard` (its
pid) and `decided`. `decided` is a symlink, `confirmed` or `expired`, made atomically by whichever of confirm
and guard comes first. Guards run as `sh -c ... bf-shape-guard TOKEN ...`; a pid is only killed when its
/proc/PID/cmdline shows that, since pids get recycled.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shlex
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

from remote.transport.base import CommandResult, HostError, Transport
from remote.transport.ssh import SSHTransport

STATE_ROOT = ".cache/benchfleet/shape"
"""Under the home directory of the user benchfleet logs in as on the host."""
COMMAND_TIMEOUT = 30.0
CONFIRM_WITHIN = 30.0
TBF_LATENCY = "50ms"
TIMER_HZ = 250
"""tbf's burst has to cover one timer tick at the shaped rate, or the rate is not reached."""
MIN_BURST = 4000
"""Bytes (32 kbit): at least a few full-size packets, whatever the rate."""
MAX_REVERT_AFTER = 30 * 24 * 3600.0
CAP_NET_ADMIN = 12

_INTERFACE = re.compile(r"[A-Za-z0-9_.@][A-Za-z0-9_.@-]{0,14}")
_RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)bit", re.IGNORECASE)
_DELAY = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s)", re.IGNORECASE)
_TOKEN = re.compile(r"[0-9a-f]{16}")
_HANDLE = re.compile(r"[0-9a-f]{1,4}:")
_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_DELAY_UNITS = {"us": 1, "ms": 10**3, "s": 10**6}


class ShapeError(Exception):
    """Shaping cannot be done or undone as asked; one line: host, interface, what failed, what to do."""


@dataclass(frozen=True)
class ShapeRequest:
    """What one host's interface should look like while the stage runs."""

    interface: str
    delay: str | None
    """"10ms", "100ms": needs the netem qdisc."""
    rate: str | None
    """"1gbit", "100mbit", "0.1gbit" (tc's SI units, bits per second; normalised to "100mbit")."""
    limit: int | None
    """netem: queue length in packets (the Petals seed uses 225000); tbf: queue size in bytes."""
    qdisc: Literal["auto", "netem", "tbf"] = "auto"
    """auto: netem when a delay is asked (refused where the kernel lacks netem), tbf for a rate alone."""
    revert_after: float = 6 * 3600.0
    """Seconds after which the armed guard reverts the shaping by itself, confirmed or not."""
    confirm_within: float = CONFIRM_WITHIN
    """Seconds the guard waits for the confirmation before reverting (capped at revert_after)."""


@dataclass
class Applied:
    """What was applied, for results labels and for revert."""

    host: str
    interface: str
    qdisc: str
    description: str
    """e.g. "tbf rate 100mbit" or "netem delay 10ms rate 1gbit limit 225000"."""
    guard_pid: int
    token: str
    handle: str = ""
    """The root qdisc's handle ("4a2f:"), made from the token: what revert deletes, and only that."""
    before: str = ""
    """The root qdisc kind before shaping (noqueue, fq_codel, mq...); deleting ours brings it back."""
    run_id: str = ""
    deadline: float = 0.0
    """Epoch seconds (engine clock) at which the guard reverts by itself."""


@dataclass(frozen=True)
class _Plan:
    """A validated request: the qdisc chosen and tc's arguments, except tbf's burst (it needs the MTU)."""

    interface: str
    qdisc: Literal["netem", "tbf"]
    delay: str | None
    rate: str | None
    rate_bits: int
    limit: int | None
    revert_after: float
    confirm_within: float

    def description(self) -> str:
        parts: list[str] = [self.qdisc]
        if self.delay:
            parts += ["delay", self.delay]
        if self.rate:
            parts += ["rate", self.rate]
        if self.limit is not None:
            parts += ["limit", str(self.limit)]
        return " ".join(parts)

    def tc_args(self, mtu: int) -> list[str]:
        if self.qdisc == "netem":
            return self.description().split()
        assert self.rate is not None
        burst = max(self.rate_bits // 8 // TIMER_HZ, 2 * mtu, MIN_BURST)
        args = ["tbf", "rate", self.rate, "burst", str(burst)]
        return args + (["limit", str(self.limit)] if self.limit is not None else ["latency", TBF_LATENCY])


@dataclass(frozen=True)
class _HostInfo:
    """What the probe found on the host."""

    root_kind: str
    mtu: int


# ---------------------------------------------------------------------------------------------- validation


def normalise_rate(text: str) -> str:
    """`0.1Gbit` -> `100mbit`: the largest unit keeping the number whole; ValueError says what is accepted."""
    return _format_rate(_rate_bits(text))


def _rate_bits(text: str) -> int:
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"rate {text!r} is not a rate; write it like 1gbit, 100mbit or 0.1gbit "
                         "(bits per second)")
    try:
        bits = Decimal(match.group(1)) * _RATE_UNITS[match.group(2).lower()]
    except InvalidOperation:
        raise ValueError(f"rate {text!r} is not a number of bits per second") from None
    if bits != bits.to_integral_value() or bits < 8:
        raise ValueError(f"rate {text!r} must be a whole number of bits per second, at least 8bit")
    if bits > 100 * 10**12:
        raise ValueError(f"rate {text!r} is above 100tbit; tc cannot shape that")
    return int(bits)


def _format_rate(bits: int) -> str:
    for unit in ("t", "g", "m", "k"):
        if bits % _RATE_UNITS[unit] == 0:
            return f"{bits // _RATE_UNITS[unit]}{unit}bit"
    return f"{bits}bit"


def normalise_delay(text: str) -> str:
    """`0.1s` -> `100ms`; ValueError says what is accepted."""
    match = _DELAY.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"delay {text!r} is not a duration; write it like 10ms, 100ms or 1s")
    micros = Decimal(match.group(1)) * _DELAY_UNITS[match.group(2).lower()]
    if micros != micros.to_integral_value() or micros <= 0:
        raise ValueError(f"delay {text!r} must be a positive whole number of microseconds")
    if micros > 60 * 10**6:
        raise ValueError(f"delay {text!r} is above 60s; nothing would get through")
    us = int(micros)
    if us % 10**6 == 0:
        return f"{us // 10**6}s"
    if us % 10**3 == 0:
        return f"{us // 10**3}ms"
    return f"{us}us"


def check_interface(name: str) -> str:
    """The name if Linux allows it as an interface (ValueError otherwise): it goes into commands and paths."""
    if not _INTERFACE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"interface {name!r} is not a network interface name (letters, digits, _ . @ -; "
                         "at most 15 characters)")
    return name


def _plan(host: str, request: ShapeRequest) -> _Plan:
    """Validate and normalise a request; ShapeError names the host and the field."""
    try:
        interface = check_interface(request.interface)
        delay = normalise_delay(request.delay) if request.delay is not None else None
        bits = _rate_bits(request.rate) if request.rate is not None else 0
    except ValueError as exc:
        raise ShapeError(f"host {host}: {exc}") from None
    rate = _format_rate(bits) if request.rate is not None else None
    where = f"host {host}: {interface}"
    limit = request.limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit < 2**31):
        raise ShapeError(f"{where}: limit {limit!r} must be a whole number from 1 to {2**31 - 1}")
    if not 0 < request.revert_after <= MAX_REVERT_AFTER:
        raise ShapeError(f"{where}: revert_after {request.revert_after!r} must be between 0 and "
                         f"{MAX_REVERT_AFTER:.0f} seconds")
    if not request.confirm_within > 0:
        raise ShapeError(f"{where}: confirm_within {request.confirm_within!r} must be positive")
    if delay is None and rate is None:
        raise ShapeError(f"{where}: nothing to shape; give a delay, a rate or both")
    qdisc: Literal["netem", "tbf"]
    if request.qdisc == "tbf":
        if delay is not None:
            raise ShapeError(f"{where}: tbf cannot add delay={delay}; use qdisc = \"netem\" (or \"auto\") "
                             "or drop `delay`")
        qdisc = "tbf"
    elif request.qdisc == "netem" or delay is not None:
        qdisc = "netem"
    elif request.qdisc == "auto":
        qdisc = "tbf"
    else:
        raise ShapeError(f"{where}: qdisc {request.qdisc!r} is not one of auto, netem, tbf")
    return _Plan(interface=interface, qdisc=qdisc, delay=delay, rate=rate, rate_bits=bits, limit=limit,
                 revert_after=float(request.revert_after),
                 confirm_within=min(float(request.confirm_within), float(request.revert_after)))


def _check_run_id(host: str, run_id: str) -> None:
    if not _RUN_ID.fullmatch(run_id):
        raise ShapeError(f"host {host}: run id {run_id!r} cannot name a state folder "
                         "(letters, digits, _ . -)")


def _missing_kind(host: str, plan: _Plan) -> ShapeError:
    asked = f"delay={plan.delay}" if plan.delay else f"qdisc={plan.qdisc}"
    todo = "Load sch_netem or drop `delay`" if plan.qdisc == "netem" else "Load sch_tbf or drop the stage"
    return ShapeError(f"host {host}: the kernel has no {plan.qdisc} qdisc, so {asked} cannot be applied; "
                      f"results would be mislabelled as shaped. {todo}")


# ---------------------------------------------------------------------------------------------- parsing


def _root_line(tc_show_output: str) -> tuple[str, str] | None:
    """(kind, handle) of the root qdisc in `tc qdisc show dev IF` output."""
    for line in tc_show_output.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "qdisc" and fields[3] == "root":
            return fields[1], fields[2]
    return None


def current_qdisc(tc_show_output: str) -> str:
    """The root qdisc's kind (`noqueue`, `fq_codel`, `tbf`...) in `tc qdisc show dev IF`; "" if none shows."""
    root = _root_line(tc_show_output)
    return root[0] if root else ""


def _sections(text: str) -> dict[str, list[str]]:
    """Lines `key value...` printed by the host scripts, grouped by key."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            found.setdefault(key, []).append(value)
    return found


def _first(sections: dict[str, list[str]], key: str) -> str:
    values = sections.get(key)
    return values[0].strip() if values else ""


def _handle_for(token: str) -> str:
    """A root handle from the token, below the range the kernel gives handle-less qdiscs (8000: and up)."""
    return f"{0x1000 + int(token[:4], 16) % 0x7000:x}:"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


# ---------------------------------------------------------------------------------------------- host scripts

# Every script runs as `sh -c SCRIPT bf-shape ARGS...` built with shlex.join: values only ever arrive as
# positional parameters, never spliced into the script text.
_FIND_TOOLS = r"""
tc=$(command -v tc 2>/dev/null) || tc=
[ -n "$tc" ] || for p in /usr/sbin/tc /sbin/tc; do [ -x "$p" ] && { tc=$p; break; }; done
ip=$(command -v ip 2>/dev/null) || ip=
[ -n "$ip" ] || for p in /usr/sbin/ip /sbin/ip /bin/ip; do [ -x "$p" ] && { ip=$p; break; }; done
"""

# A fresh network namespace (unshare -n) is a side-effect-free place to try a netem qdisc on its `lo`: the
# test qdisc vanishes with the namespace. Where unshare is not allowed, module lists give a weaker answer.
_PROBE = _FIND_TOOLS + r"""
ifc=$1 want_netem=$2
echo "tc $tc"
echo "ip $ip"
sed -n 's/^CapEff:[[:space:]]*/cap /p' /proc/self/status 2>/dev/null
echo "ssh $SSH_CONNECTION"
if [ -n "$ip" ]; then
  "$ip" -o link show 2>/dev/null | sed 's/^/links /'
  "$ip" -o link show dev "$ifc" 2>/dev/null | sed 's/^/link /'
  "$ip" -o addr show dev "$ifc" 2>/dev/null | sed 's/^/addr /'
  set -- $SSH_CONNECTION
  [ -n "$1" ] && "$ip" -o route get "$1" 2>/dev/null | sed 's/^/route /'
fi
[ -n "$tc" ] || exit 0
"$tc" qdisc show dev "$ifc" 2>&1 | sed 's/^/qdisc /'
for f in "$HOME"/.cache/benchfleet/shape/*/"$ifc"/state; do
  [ -f "$f" ] && echo "armed $(basename "$(dirname "$(dirname "$f")")") $(sed -n 's/^handle=//p' "$f")"
done
[ "$want_netem" = 1 ] || exit 0
if unshare -n true 2>/dev/null; then
  out=$(unshare -n "$tc" qdisc add dev lo root netem delay 1ms 2>&1) && { echo "netem yes"; exit 0; }
  case $out in *"kind is unknown"*) echo "netem no"; exit 0;; esac
fi
grep -q '^sch_netem ' /proc/modules 2>/dev/null && { echo "netem yes"; exit 0; }
mods=/lib/modules/$(uname -r)
if [ -d "$mods" ]; then
  if grep -q '/sch_netem\.ko' "$mods/modules.builtin" "$mods/modules.dep" 2>/dev/null; then echo "netem yes"
  else echo "netem no"; fi
else echo "netem unknown"; fi
"""

_GUARD = r"""
d=$2 ifc=$3 handle=$4 window=$5 rest=$6 tc=$7
echo $$ > "$d/guard.tmp" && mv -f "$d/guard.tmp" "$d/guard"
sleep "$window"
if ln -s expired "$d/decided" 2>/dev/null; then "$tc" qdisc del dev "$ifc" root handle "$handle"; exit 0; fi
sleep "$rest"
"$tc" qdisc del dev "$ifc" root handle "$handle"
"""

# The state folder is made with mkdir (atomic, fails if present) before anything else, so one run never arms
# two transactions on one interface; the state file exists before the guard, the guard before the qdisc.
_ARM = _FIND_TOOLS + f"guard={shlex.quote(_GUARD)}\n" + r"""
run_id=$1 ifc=$2 token=$3 handle=$4 window=$5 rest=$6 content=$7; shift 7
[ -n "$tc" ] || { echo "tc is not installed"; exit 19; }
root="$HOME/.cache/benchfleet/shape/$run_id"; d="$root/$ifc"
umask 077
mkdir -p "$root" || { echo "cannot create $root"; exit 20; }
mkdir "$d" 2>/dev/null || { echo "$d exists"; exit 21; }
{ printf '%s\n' "$content" > "$d/state.tmp" && mv -f "$d/state.tmp" "$d/state"; } ||
  { echo "cannot write $d"; exit 22; }
cd / && setsid -f sh -c "$guard" bf-shape-guard "$token" "$d" "$ifc" "$handle" "$window" "$rest" "$tc" \
  </dev/null >/dev/null 2>&1 || { echo "setsid is missing (install util-linux)"; exit 23; }
i=0; while [ ! -s "$d/guard" ] && [ $i -lt 250 ]; do sleep 0.02; i=$((i+1)); done
[ -s "$d/guard" ] || { echo "the guard did not start within 5s"; exit 24; }
read -r pid < "$d/guard"; echo "guard $pid"
"$tc" qdisc replace dev "$ifc" root handle "$handle" "$@" 2>&1 | sed 's/^/tc /'
"$tc" qdisc show dev "$ifc" | grep -q "^qdisc [a-z_]* $handle root" || exit 25
"""

_GUARD_ALIVE = r"""
guard_alive() {
  [ -n "$1" ] && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -qF "bf-shape-guard $token "
}
"""

_CONFIRM = _FIND_TOOLS + _GUARD_ALIVE + r"""
run_id=$1 ifc=$2 token=$3
d="$HOME/.cache/benchfleet/shape/$run_id/$ifc"
if ln -s confirmed "$d/decided" 2>/dev/null; then echo "decided confirmed"
else echo "decided $(readlink "$d/decided" 2>/dev/null)"; fi
pid=; [ -s "$d/guard" ] && read -r pid < "$d/guard"
if guard_alive "$pid"; then echo "guard alive"; else echo "guard gone"; fi
"$tc" qdisc show dev "$ifc" 2>&1 | sed 's/^/qdisc /'
"""

# The guard is disarmed only once our qdisc is gone: after a failed delete it stays armed, so it still fires.
_REVERT = _FIND_TOOLS + _GUARD_ALIVE + r"""
run_id=$1 ifc=$2 token=$3 handle=$4 pid=$5
root="$HOME/.cache/benchfleet/shape/$run_id"; d="$root/$ifc"
[ -n "$tc" ] || { echo "tc is not installed"; exit 19; }
err=$("$tc" qdisc del dev "$ifc" root handle "$handle" 2>&1) || echo "tc $err"
if "$tc" qdisc show dev "$ifc" 2>/dev/null | grep -q "^qdisc [a-z_]* $handle root"; then exit 30; fi
for p in "$pid" $(cat "$d/guard" 2>/dev/null); do
  guard_alive "$p" && { kill -TERM "-$p" 2>/dev/null || kill -TERM "$p"; echo "killed $p"; }
done
rm -f "$d/state" "$d/guard" "$d/decided" "$d/state.tmp" "$d/guard.tmp"
rmdir "$d" 2>/dev/null; rmdir "$root" 2>/dev/null
exit 0
"""

_LIST = r"""
root="$HOME/.cache/benchfleet/shape/$1"
for d in "$root"/*; do
  [ -d "$d" ] || continue
  if [ ! -f "$d/state" ]; then rm -f "$d/state.tmp"; rmdir "$d" 2>/dev/null; continue; fi
  echo "begin ${d##*/}"
  sed 's/^/state /' "$d/state"
  [ -s "$d/guard" ] && echo "state guard_pid=$(cat "$d/guard")"
done
rmdir "$root" 2>/dev/null
exit 0
"""


async def _sh(transport: Transport, script: str, args: list[str]) -> CommandResult:
    return await transport.run(["sh", "-c", script, "bf-shape", *args], COMMAND_TIMEOUT)


# ---------------------------------------------------------------------------------------------- probe


async def probe(transport: Transport, host: str, request: ShapeRequest, *,
                allow_control_interface: bool = False) -> str:
    """Which qdisc `apply` will use ("netem" or "tbf"); ShapeError when the host cannot shape as asked.

    Checks tc, CAP_NET_ADMIN, the interface, netem (when needed), a root qdisc someone configured, and, over
    SSH, that the interface does not carry the SSH control connection: shaping it would slow or cut the
    engine's own link. `allow_control_interface=True` lifts that one refusal, which is safe because the armed
    guard reverts any change that no fresh command confirms. Testbed hosts have only eth0: tests pass it.
    """
    plan = _plan(host, request)
    await _inspect(transport, host, plan, allow_control_interface=allow_control_interface)
    return plan.qdisc


async def _inspect(transport: Transport, host: str, plan: _Plan, *,
                   allow_control_interface: bool) -> _HostInfo:
    ifc = plan.interface
    result = await _sh(transport, _PROBE, [ifc, "1" if plan.qdisc == "netem" else "0"])
    if result.rc != 0:
        raise ShapeError(f"host {host}: the shaping probe failed (status {result.rc}: "
                         f"{_one_line(result.stderr or result.stdout)}); check that `sh` works there")
    found = _sections(result.stdout)
    if not _first(found, "tc"):
        raise ShapeError(f"host {host}: tc is not installed; install iproute2 or drop the shape stage")
    with contextlib.suppress(ValueError):
        if not int(_first(found, "cap"), 16) >> CAP_NET_ADMIN & 1:
            raise ShapeError(f"host {host}: {ifc}: changing qdiscs needs root (CAP_NET_ADMIN); log in as "
                             "root (User in ssh_config) or drop the shape stage")
    shown = "\n".join(found.get("qdisc", []))
    if "Cannot find device" in shown or (_first(found, "ip") and not found.get("link")):
        names = sorted({line.split(":")[1].strip().split("@")[0]
                        for line in found.get("links", []) if line.count(":") >= 2})
        raise ShapeError(f"host {host}: no interface {ifc} (it has: {', '.join(names) or 'none listed'}); "
                         "set the shape stage's interface to one of them")
    root = _root_line(shown)
    if root is None:
        raise ShapeError(f"host {host}: {ifc}: `tc qdisc show` printed no root qdisc ({_one_line(shown)}); "
                         "check the interface")
    kind, handle = root
    if plan.qdisc == "netem" and _first(found, "netem") == "no":
        raise _missing_kind(host, plan)
    for line in found.get("armed", []):
        armed_by, _, armed_handle = line.partition(" ")
        if armed_handle.strip() == handle:
            raise ShapeError(f"host {host}: {ifc} is still shaped by benchfleet run {armed_by} "
                             f"({kind} {handle}); resume that run (it reverts first) or wait for its guard")
    if handle != "0:":
        raise ShapeError(f"host {host}: {ifc} already has a configured root qdisc ({kind} {handle}), which "
                         f"a revert would not bring back; remove it (tc qdisc del dev {ifc} root) or shape "
                         "another interface")
    if isinstance(transport, SSHTransport) and not allow_control_interface:
        reason = _control_reason(found, ifc)
        if reason:
            raise ShapeError(f"host {host}: {ifc} {reason}; shaping it would slow or cut benchfleet's own "
                             "link. Shape another interface, or pass allow_control_interface (the armed "
                             "guard still reverts)")
    mtu = 1500
    for line in found.get("link", []):
        match = re.search(r"\bmtu (\d+)", line)
        if match:
            mtu = int(match.group(1))
    return _HostInfo(root_kind=kind, mtu=mtu)


def _control_reason(found: dict[str, list[str]], ifc: str) -> str:
    """Why `ifc` is the SSH control path ("" if not): it holds the server address or routes to the client."""
    session = _first(found, "ssh").split()
    if len(session) < 4:
        return "may carry the SSH connection (the host sets no SSH_CONNECTION to tell)"
    client, server = session[0], _bare_address(session[2])
    for line in found.get("addr", []):
        fields = line.split()
        for i, field in enumerate(fields[:-1]):
            if field in ("inet", "inet6") and _bare_address(fields[i + 1].split("/")[0]) == server:
                return f"carries {server}, the address the SSH connection came in on"
    for line in found.get("route", []):
        fields = line.split()
        if "dev" in fields[:-1] and fields[fields.index("dev") + 1] == ifc:
            return f"is the route back to {client}, the SSH client"
    return ""


def _bare_address(text: str) -> str:
    text = text.split("%", maxsplit=1)[0].lower()
    return text.removeprefix("::ffff:") if text.count(".") == 3 else text


# ---------------------------------------------------------------------------------------------- transaction


async def apply(transport: Transport, host: str, request: ShapeRequest, *, run_id: str,
                allow_control_interface: bool = False) -> Applied:
    """Probe, arm the guard, apply, then confirm over a fresh command; on any failure revert at once.

    ShapeError for anything about shaping; HostError (ConnectionLost) when the host cannot be reached before
    anything was armed. See `probe` for `allow_control_interface`.
    """
    _check_run_id(host, run_id)
    plan = _plan(host, request)
    info = await _inspect(transport, host, plan, allow_control_interface=allow_control_interface)
    applied = await _arm_and_apply(transport, host, plan, info, run_id)
    try:
        await confirm(transport, applied)
    except (ShapeError, HostError) as exc:
        if await _revert_quietly(transport, applied):
            raise ShapeError(f"{exc} (so it was reverted)") from None
        raise ShapeError(f"{exc} (its guard reverts it within {plan.confirm_within:.0f}s)") from None
    return applied


async def _arm_and_apply(transport: Transport, host: str, plan: _Plan, info: _HostInfo,
                         run_id: str) -> Applied:
    """Steps 1 and 2 of the transaction: start the guard (short fuse until confirmed), replace the qdisc."""
    token = secrets.token_hex(8)
    handle = _handle_for(token)
    applied = Applied(host=host, interface=plan.interface, qdisc=plan.qdisc, description=plan.description(),
                      guard_pid=0, token=token, handle=handle, before=info.root_kind, run_id=run_id,
                      deadline=time.time() + plan.revert_after)
    content = "\n".join(f"{key}={value}" for key, value in (
        ("host", host), ("interface", plan.interface), ("qdisc", plan.qdisc),
        ("description", applied.description), ("token", token), ("handle", handle),
        ("before", info.root_kind), ("deadline", f"{applied.deadline:.0f}"),
    ))
    window = plan.confirm_within
    args = [run_id, plan.interface, token, handle, f"{window:.3f}", f"{plan.revert_after - window:.3f}",
            content, *plan.tc_args(info.mtu)]
    where = f"host {host}: {plan.interface}"
    try:
        result = await _sh(transport, _ARM, args)
    except HostError as exc:
        await _revert_quietly(transport, applied)
        raise ShapeError(f"{where}: the link failed while applying {applied.description} ({exc}); if it got "
                         f"applied, its guard reverts it within {window:.0f}s") from None
    found = _sections(result.stdout)
    with contextlib.suppress(ValueError):
        applied.guard_pid = int(_first(found, "guard") or "0")
    if result.rc == 0:
        return applied
    if result.rc == 21:  # the folder belongs to an earlier transaction of this run: leave it alone
        raise ShapeError(f"{where}: this run shaped it before and has not reverted; call revert_stale first")
    await _revert_quietly(transport, applied)
    tc_error = _one_line(" ".join(found.get("tc", [])))
    if "kind is unknown" in tc_error:
        raise _missing_kind(host, plan)
    if result.rc == 25:
        raise ShapeError(f"{where}: tc refused {applied.description} ({tc_error or 'no message'}); nothing "
                         "was left applied. Check the values")
    message = _one_line(result.stdout) or f"status {result.rc}"
    raise ShapeError(f"{where}: cannot arm the revert guard ({message}); nothing was applied")


async def confirm(transport: Transport, applied: Applied) -> None:
    """Over a fresh command: the guard is armed and the root qdisc is ours. Leaves the guard armed.

    The first call turns the guard's short fuse into the long one (`revert_after`). Later calls check that the
    host is still shaped, say before labelling results, since the guard may have fired meanwhile.
    """
    where = f"host {applied.host}: {applied.interface}"
    result = await _sh(transport, _CONFIRM, [applied.run_id, applied.interface, applied.token])
    found = _sections(result.stdout)
    if result.rc != 0:
        raise ShapeError(f"{where}: cannot confirm {applied.description} (status {result.rc}: "
                         f"{_one_line(result.stderr)})")
    decided = _first(found, "decided")
    if decided == "expired":
        raise ShapeError(f"{where}: {applied.description} was not confirmed in time, so its guard reverted "
                         "it; raise confirm_within if the host answers slowly")
    root = _root_line("\n".join(found.get("qdisc", [])))
    if root != (applied.qdisc, applied.handle):
        now = root[0] if root else "none"
        late = time.time() >= applied.deadline - 1
        why = "its guard reached its deadline" if late else "someone changed it"
        raise ShapeError(f"{where}: {applied.description} is no longer applied (root qdisc: {now}; {why}); "
                         "results from now on would be mislabelled. Re-run the shape stage")
    if _first(found, "guard") != "alive" or decided != "confirmed":
        raise ShapeError(f"{where}: the revert guard of {applied.description} is gone, so the shaping could "
                         "outlive the engine; revert it and re-run the shape stage")


async def revert(transport: Transport, applied: Applied) -> None:
    """Delete our root qdisc (only ours, by handle; idempotent), then kill the guard and remove its state."""
    where = f"host {applied.host}: {applied.interface}"
    result = await _sh(transport, _REVERT, [applied.run_id, applied.interface, applied.token, applied.handle,
                                            str(applied.guard_pid)])
    if result.rc == 30:
        tc_error = _one_line(" ".join(_sections(result.stdout).get("tc", [])))
        at = time.strftime("%H:%M:%S", time.localtime(applied.deadline))
        raise ShapeError(f"{where}: cannot delete {applied.description} ({tc_error}); its guard stays armed "
                         f"and deletes it by itself at {at}")
    if result.rc != 0:
        raise ShapeError(f"{where}: revert failed (status {result.rc}: "
                         f"{_one_line(result.stdout + result.stderr)}); its guard stays armed")


async def _revert_quietly(transport: Transport, applied: Applied) -> bool:
    """Best effort after a failure: True when the host is known to be unshaped again."""
    try:
        await revert(transport, applied)
    except (ShapeError, HostError):
        return False
    return True


async def revert_stale(transport: Transport, host: str, run_id: str) -> list[str]:
    """Revert what a crashed engine left for `run_id` on this host; returns "IF: description" for each.

    Every transaction is tried even when one fails; the first failure is raised afterwards.
    """
    _check_run_id(host, run_id)
    result = await _sh(transport, _LIST, [run_id])
    if result.rc != 0:
        raise ShapeError(f"host {host}: cannot read the shaping state of run {run_id} (status {result.rc}); "
                         "check the home directory there")
    reverted: list[str] = []
    failures: list[ShapeError] = []
    for entry in _stale_entries(host, run_id, result.stdout):
        try:
            await revert(transport, entry)
        except ShapeError as exc:
            failures.append(exc)
            continue
        reverted.append(f"{entry.interface}: {entry.description}")
    if failures:
        raise failures[0]
    return reverted


def _stale_entries(host: str, run_id: str, listing: str) -> list[Applied]:
    """The state files the host listed, each validated: their values go back into commands."""
    entries: list[dict[str, str]] = []
    for line in listing.splitlines():
        key, _, value = line.partition(" ")
        if key == "begin":
            entries.append({"folder": value})
        elif key == "state" and entries:
            name, _, text = value.partition("=")
            entries[-1][name] = text
    applied: list[Applied] = []
    for fields in entries:
        interface, token, handle = fields.get("folder", ""), fields.get("token", ""), fields.get("handle", "")
        if not (_INTERFACE.fullmatch(interface) and _TOKEN.fullmatch(token) and _HANDLE.fullmatch(handle)):
            raise ShapeError(f"host {host}: the shaping state of run {run_id} for {interface!r} is damaged; "
                             f"check ~/{STATE_ROOT}/{run_id} there and undo its shaping by hand")
        pid = fields.get("guard_pid", "0").strip()
        deadline = fields.get("deadline", "0")
        applied.append(Applied(
            host=host, interface=interface, qdisc=fields.get("qdisc", ""),
            description=fields.get("description", "") or "shaping",
            guard_pid=int(pid) if pid.isdigit() else 0, token=token, handle=handle,
            before=fields.get("before", ""), run_id=run_id,
            deadline=float(deadline) if deadline.isdigit() else 0.0,
        ))
    return applied
