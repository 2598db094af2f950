"""Ray stages: the cluster's readiness as `ray status` shows it, and `executor = "ray"` queue stages, whose cells
run as Ray tasks on that cluster through a small driver (remote/ray_task.py) copied to the head.

Starting and stopping `ray start` instances is the service lifecycle (service_stage.py); this adds what is Ray's own.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from remote.attempt import Attempt, TrialFailed
from remote.plan import StagePlan, ray_cluster_of
from remote.recipe import QueueStage, RayStage, parse_duration
from remote.recipe_loader import stage_name
from remote.slots import Slot
from remote.stages.context import EngineParts
from remote.transport.base import HostError


class RayStages:
    """The engine's Ray stages (a mixin of Engine)."""

    async def _wait_ray(self: EngineParts, stage: StagePlan, spec: RayStage, started: Sequence[Attempt]) -> None:
        assert self.plan is not None
        head = started[0]
        address = str(self._capture_values.get(f"{stage.name}.address", ""))
        hosts = [a.slot.host for a in started]
        per_host = [spec.gpus_per_host if spec.gpus_per_host is not None
                    else sum(1 for s in self.plan.slots if s.host == h) for h in hosts]
        want_gpus = float(sum(per_host))
        deadline = time.monotonic() + parse_duration(spec.timeout)
        status = ""
        while True:
            result = await head.transport.run([spec.ray, "status", f"--address={address}"], timeout=60.0)
            status = result.stdout
            nodes, gpus = parse_ray_status(status)
            if result.rc == 0 and nodes >= len(hosts) and gpus >= want_gpus:
                break
            if time.monotonic() > deadline:
                raise TrialFailed(f"ray cluster at {address} shows {nodes}/{len(hosts)} node(s) and "
                                   f"{gpus:g}/{want_gpus:g} GPU(s) after {parse_duration(spec.timeout):.0f}s; "
                                   f"check the workers' logs ({', '.join(hosts[1:]) or 'none'})")
            for a in started:
                if a.finished.done():
                    raise TrialFailed(f"ray on {a.slot.host} exited while the cluster formed; last lines: "
                                       f"{self._last_lines(a)}")
            await asyncio.sleep(1.0)
        self._capture_values[f"{stage.name}.hosts"] = len(hosts)
        self._capture_values[f"{stage.name}.gpus_per_host"] = per_host[0] if per_host else 0
        self._capture_values[f"{stage.name}.gpus"] = int(want_gpus)
        if self.journal is not None:
            self.journal.event("ray-status", stage=stage.name, status=status[-4000:])

    async def _through_ray(self: EngineParts, stage: StagePlan, spec: QueueStage, slot: Slot, argv: list[str],
                           env: Mapping[str, str]) -> list[str]:
        """Wrap a task's argv so it runs as a Ray task on the cluster of an earlier ray stage (see ray_task.py)."""
        assert self.plan is not None
        position = next(i for i, s in enumerate(self.loaded.recipe.stage) if s is spec)
        names = [stage_name(s) for s in self.loaded.recipe.stage]
        cluster, _ = ray_cluster_of(spec, self.loaded.recipe.stage[:position], names[:position])
        address = self._capture_values.get(f"{cluster}.address")
        if address is None:
            raise HostError(f"stage {stage.name}: the ray cluster of stage {cluster} is not running in this trial")
        script = self._ray_scripts.get(slot.host)
        if script is None:
            text = (Path(__file__).parent.parent / "ray_task.py").read_text()
            script = self._ray_scripts[slot.host] = await self._transports[slot.host].put_file("bf-ray-task.py", text)
        python = self._python_for(slot.host)
        keys = ",".join(sorted({*env, *self._secrets(), "BENCHFLEET_TASK_ID", "BENCHFLEET_ATTEMPT"}))
        return [python, script, "--address", str(address), "--num-gpus", f"{spec.gpus_per_task:g}", "--env-keys",
                keys, "--", *argv]


_RAY_RESOURCE = re.compile(r"^\s*([\d.]+)/([\d.]+)\s+GPU\b", re.MULTILINE)
_RAY_NODE = re.compile(r"^\s*\d+\s+node_[0-9a-f]+", re.MULTILINE)


def parse_ray_status(text: str) -> tuple[int, float]:
    """(active nodes, total GPUs) from `ray status`: nodes under "Active:" (older Ray: "Healthy:"), and the
    resource line " 0.0/32.0 GPU"."""
    section = re.search(r"^(?:Active|Healthy):\s*$(.*?)^(?:Pending|Idle|Recent failures|Resources)", text,
                        re.MULTILINE | re.DOTALL)
    nodes = len(_RAY_NODE.findall(section.group(1))) if section else 0
    gpu = _RAY_RESOURCE.search(text)
    return nodes, float(gpu.group(2)) if gpu else 0.0
