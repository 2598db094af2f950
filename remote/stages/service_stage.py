"""Service-like stages (service, and the service side of ray, swarm and pipeline): long-running instances that
later stages of the trial use.

Instances start group by group (a swarm's DHT before its servers, a Ray head before its workers); each must pass its
readiness rule (a log line, a listening port, a command) before the next group starts, and what they print is
captured for later stages ({dht.initial_peers}). A service that dies while its trial runs fails the trial; teardown
stops them in reverse order however the trial ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import shlex
import time
from collections.abc import Sequence

from remote.aio import within
from remote.attempt import Attempt, TrialFailed, exit_reason
from remote.events import StageStarted
from remote.plan import ServiceRole, StagePlan, TaskPlan
from remote.recipe import PipelineStage, RayStage, SwarmStage
from remote.slots import Slot
from remote.stages.context import EngineParts
from remote.template import render


class ServiceStages:
    """The engine's service-like stages (a mixin of Engine)."""

    # Engine state these methods set (declared for mypy; the engine initialises it).
    _trial_failure: str | None
    _pending_teardown: list[Attempt]

    async def _start_services(self: EngineParts, stage: StagePlan) -> list[Attempt]:
        """Launch a service-like stage group by group, wait until each instance is ready, publish its captures."""
        assert self.journal is not None and self.plan is not None
        started: list[Attempt] = []
        self.journal.event("stage-started", stage=stage.name, pending=len(stage.tasks), adopted=0)
        self._emit(StageStarted(stage=stage.name, kind=stage.kind, total=len(stage.tasks), already_done=0))
        slots = {s.key: s for s in self.plan.slots}
        groups = sorted({t.service.group for t in stage.tasks if t.service is not None})
        try:
            for group in groups:
                members = [t for t in stage.tasks if t.service is not None and t.service.group == group]
                batch: list[Attempt] = []
                for task in members:
                    if self._stopping:
                        raise TrialFailed("stopped while starting services")
                    slot = slots.get(task.pinned_slot or "") or self._slot_of_host(task)
                    number = self.journal.next_attempt(task.id)
                    attempt = await self._launch(stage, task, slot, number)
                    if attempt is None:
                        raise TrialFailed("stopped while starting services")
                    role = task.service
                    assert role is not None
                    attempt.ready_pattern = re.compile(role.ready_log) if role.ready_log else None
                    attempt.capture_patterns = {k: re.compile(v) for k, v in role.capture.items()}
                    batch.append(attempt)
                    started.append(attempt)
                await asyncio.gather(*(self._until_ready(stage, a) for a in batch))
                self._publish_captures(stage, batch)
            await self._cluster_checks(stage, started)
        except BaseException:
            # Whatever failed, what did start must still be torn down by the trial.
            self._pending_teardown = started
            raise
        names = ", ".join(f"{{{k}}}" for k in sorted(self._capture_values) if k.startswith(stage.name + "."))
        self._note("info", f"stage {stage.name}: {len(started)} instance(s) ready" + (f"; {names}" if names else ""))
        self.journal.event("stage-finished", stage=stage.name, counts={"running": len(started)}, halted=False)
        return started

    def _slot_of_host(self: EngineParts, task: TaskPlan) -> Slot:
        """The slot a service instance was pinned to when discovery no longer lists it (GPUs changed)."""
        host, _, gpu = (task.pinned_slot or "local:0").rpartition(":")
        return Slot(host=host, gpu=int(gpu) if gpu.isdigit() else 0)

    async def _until_ready(self: EngineParts, stage: StagePlan, attempt: Attempt) -> None:
        """Wait for the instance's readiness rule, or fail the trial with what is missing and its last lines."""
        role = attempt.task.service
        assert role is not None
        deadline = time.monotonic() + role.ready_timeout
        what = f"service {stage.name} on {attempt.slot.host}"
        while True:
            if attempt.finished.done():
                state = attempt.finished.result()
                raise TrialFailed(f"{what} exited before it was ready (exit {state.rc}); "
                                   f"last lines: {self._last_lines(attempt)}")
            if await self._is_ready(attempt, role):
                self._journal_ready(stage, attempt)
                return
            if time.monotonic() > deadline:
                rule = (f"a line matching {role.ready_log!r}" if role.ready_log else
                        f"port {role.ready_port} listening" if role.ready_port else
                        f"{shlex.join(role.ready_command or ())} to succeed")
                raise TrialFailed(f"{what} was not ready after {role.ready_timeout:.0f}s (waiting for {rule}); "
                                   f"last lines: {self._last_lines(attempt)}")
            if self._stopping:
                raise TrialFailed("stopped while waiting for services")
            with contextlib.suppress(TimeoutError):
                await within(0.25, attempt.ready.wait())

    def _journal_ready(self: EngineParts, stage: StagePlan, attempt: Attempt) -> None:
        if self.journal is not None:
            self.journal.event("service-ready", attempt.task.id, stage=stage.name, host=attempt.slot.host,
                               captured=attempt.captured)

    async def _is_ready(self: EngineParts, attempt: Attempt, role: ServiceRole) -> bool:
        if role.ready_log is not None:
            needed = set(role.capture)
            return attempt.ready.is_set() and needed <= set(attempt.captured)
        if role.ready_port is not None:
            port = render(role.ready_port, self._captures())
            script = ("p=$(printf '%04X' " + shlex.quote(port) + "); "
                      "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p=\":$p\" "
                      "'$2 ~ p\"$\" && $4 == \"0A\" {f=1} END {exit !f}'")
            result = await attempt.transport.run(["sh", "-c", script], timeout=10.0)
            return result.rc == 0
        if role.ready_command is not None:
            result = await attempt.transport.run([render(a, self._captures()) for a in role.ready_command],
                                                 timeout=30.0)
            return result.rc == 0
        return True

    def _publish_captures(self: EngineParts, stage: StagePlan, batch: Sequence[Attempt]) -> None:
        """First instance that captured a value wins; the swarm's address list is narrowed to one usable peer."""
        for attempt in batch:
            for key, value in attempt.captured.items():
                self._capture_values.setdefault(f"{stage.name}.{key}", value)
        if isinstance(stage.spec, SwarmStage):
            peers = [*str(self._capture_values.get(f"{stage.name}.all_peers", "")).split(),
                     *str(self._capture_values.get(f"{stage.name}.visible_peers", "")).split()]
            self._capture_values[f"{stage.name}.initial_peers"] = choose_initial_peer(peers)
        if self.journal is not None:
            for key, captured in self._capture_values.items():
                if key.startswith(stage.name + "."):
                    self.journal.event("captured", key=key, value=str(captured))

    async def _cluster_checks(self: EngineParts, stage: StagePlan, started: Sequence[Attempt]) -> None:
        """Stage kinds whose readiness is more than their instances' (a Ray cluster seeing every node and GPU)."""
        spec = stage.spec
        if isinstance(spec, SwarmStage):
            servers = sum(1 for a in started if a.task.service is not None and a.task.service.group == 1)
            self._capture_values[f"{stage.name}.servers"] = servers
        elif isinstance(spec, PipelineStage):
            ordered = sorted(started, key=lambda a: a.task.index)
            urls = [str(a.task.service.info.get("url", "")) for a in ordered if a.task.service is not None]
            self._capture_values[f"{stage.name}.first_url"] = urls[0] if urls else ""
            self._capture_values[f"{stage.name}.urls"] = ",".join(urls)
            self._capture_values[f"{stage.name}.workers"] = len(urls)
        elif isinstance(spec, RayStage):
            await self._wait_ray(stage, spec, started)

    async def _watch_service(self: EngineParts, attempt: Attempt) -> None:
        """A service that dies while the trial runs fails the trial: its later stages are stopped."""
        state = await asyncio.shield(attempt.finished)
        if attempt.stopping or self._trial_failure is not None:
            return
        reason = (f"service {attempt.stage.name} on {attempt.slot.host} exited (exit {state.rc}) while the trial "
                  f"ran; last lines: {self._last_lines(attempt)}")
        self._abort_trial(reason)

    def _abort_trial(self: EngineParts, reason: str) -> None:
        """Stop the trial's running tasks (recorded as failed with the reason), and let the trial tear down."""
        self._trial_failure = reason
        for attempt in list(self._running.values()):
            if attempt.task.service is None and not attempt.finished.done():
                attempt.aborted = reason
                asyncio.get_running_loop().create_task(attempt.transport.kill(attempt.handle, self.options.kill_grace))
        self._signal_change()

    async def _teardown(self: EngineParts, services: Sequence[Attempt]) -> None:
        """Stop services in reverse order (kill the group, then the stop command), then revert shaping."""
        assert self.journal is not None
        pending = list(services) + [a for a in self._pending_teardown if a not in services]
        self._pending_teardown = []
        stopped_hosts: set[tuple[str, tuple[str, ...]]] = set()
        # Those that ended before the teardown died; one stop may end the others (`ray stop` ends all of Ray).
        died = {id(a) for a in pending if a.finished.done() and not a.stopping}
        for attempt in pending:
            attempt.stopping = True
        for attempt in reversed(pending):
            # Kill the group even when its leader already exited (a service that died): its children may live on
            # (hivemind-dht's p2pd); killing an empty group does nothing.
            await attempt.transport.kill(attempt.handle, self.options.kill_grace)
            if not attempt.finished.done():
                with contextlib.suppress(TimeoutError):
                    await within(self.options.kill_grace + 30, asyncio.shield(attempt.finished))
            role = attempt.task.service
            if role is not None and role.stop and (attempt.slot.host, role.stop) not in stopped_hosts:
                stopped_hosts.add((attempt.slot.host, role.stop))
                await attempt.transport.run(list(role.stop), timeout=120.0)
            self._running.pop(attempt.task.id, None)
            if not attempt.log.closed:
                attempt.log.close()
            if id(attempt) in died:  # the console and results show a failed service, not a stopped one
                rc = attempt.finished.result().rc
                reason = f"the service exited ({exit_reason(rc)}) while its trial ran"
                self.journal.end_attempt(attempt.task.id, attempt.number, "failed", rc, reason)
                self.journal.set_task_state(attempt.task.id, "failed", rc=rc, ended=time.time(), reason=reason)
                continue
            self.journal.end_attempt(attempt.task.id, attempt.number, "stopped", None, "torn down")
            self.journal.set_task_state(attempt.task.id, "stopped", ended=time.time(), reason="torn down")
        await self._revert_shaping()

    def _last_lines(self: EngineParts, attempt: Attempt, n: int = 3) -> str:
        """The last lines of an attempt's log copy, joined for a one-line message."""
        try:
            with open(self.rd.log_path(attempt.task.log_name), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no output)"
        lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
        return " | ".join(lines[-n:]) if lines else "(no output)"


def choose_initial_peer(addresses: Sequence[str]) -> str:
    """hivemind-dht lists one multiaddr per interface: prefer one other hosts can reach (not loopback)."""
    for addr in addresses:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            try:
                if not ipaddress.ip_address(parts[2]).is_loopback:
                    return addr
            except ValueError:
                continue
    return addresses[0] if addresses else ""
