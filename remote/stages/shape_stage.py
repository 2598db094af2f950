"""Shape stages: network shaping applied with tc on each host as a transaction, reverted when the trial ends.

The tc side (probe, arm a revert on the host, apply, confirm, revert) is remote/stages/shape.py; this is when the
engine calls it: at the stage, at teardown, and on --resume for shaping a crashed engine left behind. shape.py is
imported only by runs that shape (it loads the SSH transport).
"""

from __future__ import annotations

from typing import Any

from remote.attempt import TrialFailed
from remote.plan import StagePlan
from remote.recipe import ShapeStage, parse_duration
from remote.stages.context import EngineParts
from remote.template import render
from remote.transport.base import HostError, Transport


class ShapeStages:
    """The engine's shape stages (a mixin of Engine)."""

    # Engine state these methods set (declared for mypy; the engine initialises it).
    _shaped: list[tuple[Transport, Any]]

    async def _revert_stale_shaping(self: EngineParts, run_id: str) -> None:
        """Undo shaping a crashed engine left on any host (the armed guards would, but only at their deadline)."""
        if not any(isinstance(s.spec, ShapeStage) for s in self.plan.stages) if self.plan else True:
            return
        from remote.stages import shape  # noqa: PLC0415

        for host, transport in self._transports.items():
            try:
                reverted = await shape.revert_stale(transport, host, shape_state_id(run_id, host))
            except (shape.ShapeError, HostError) as exc:
                self._note("error", f"{exc}; the armed revert on the host will undo it at its deadline")
                continue
            for what in reverted:
                self._note("info", f"host {host}: reverted shaping left by the previous engine ({what})")

    async def _apply_shape(self: EngineParts, stage: StagePlan) -> None:
        """tc shaping on each host as a transaction (probe, arm a revert, apply, confirm); see remote/stages/shape."""
        from remote.stages import shape  # noqa: PLC0415

        spec = stage.spec
        assert isinstance(spec, ShapeStage) and self.journal is not None
        run_id = self.journal.meta("run_id") or self.rd.path.name
        scope = {**self.loaded.recipe.variables, **stage.trial_values}

        def filled(value: str | int | None) -> str | None:
            return None if value is None else render(str(value), scope)

        limit = filled(spec.limit)
        try:
            request = shape.ShapeRequest(interface=spec.interface, delay=filled(spec.delay), rate=filled(spec.rate),
                                         limit=int(limit) if limit is not None else None,
                                         qdisc=spec.qdisc, revert_after=parse_duration(spec.revert_after))
        except ValueError as exc:
            raise TrialFailed(f"stage {stage.name}: {exc}; expected a delay like 10ms, a rate like 100mbit and an "
                               "integer limit") from None
        labels = []
        for host in stage.hosts:
            transport = self._transports[host]
            try:
                await shape.probe(transport, host, request, allow_control_interface=spec.allow_control_interface)
                applied = await shape.apply(transport, host, request, run_id=shape_state_id(run_id, host),
                                            allow_control_interface=spec.allow_control_interface)
                self._shaped.append((transport, applied))
                await shape.confirm(transport, applied)
            except (shape.ShapeError, HostError) as exc:
                raise TrialFailed(str(exc)) from None
            labels.append(applied.description)
            self.journal.event("shaped", host=host, interface=spec.interface, qdisc=applied.description)
        self._capture_values[f"{stage.name}.label"] = labels[0] if labels else ""
        self._note("info", f"stage {stage.name}: {', '.join(sorted(set(labels)))} on {', '.join(stage.hosts)}")

    async def _revert_shaping(self: EngineParts) -> None:
        """Undo this trial's shaping, last applied first (at teardown, however the trial ended)."""
        if not self._shaped:
            return
        from remote.stages import shape  # noqa: PLC0415 (only runs that shape need tc's module)

        for transport, applied in reversed(self._shaped):
            try:
                await shape.revert(transport, applied)
                self._note("info", f"host {applied.host}: shaping on {applied.interface} reverted")
            except (shape.ShapeError, HostError) as exc:
                self._note("error", f"{exc}; the armed revert on the host will undo it at its deadline")
        self._shaped = []


def shape_state_id(run_id: str, host: str) -> str:
    """Per host: hosts may share a home directory (NFS, the testbed), and each host's shaping state is its own."""
    return f"{run_id}.{host}"
