"""Fetch stages: copy result files from the hosts into the run directory, and read the metrics that name them.

Files land in fetched/<trial>/<host>/ (private), so every trial's raw output is kept beside the results table.
"""

from __future__ import annotations

import time
from pathlib import Path

from remote.attempt import RESULT_FILE_LIMIT, TrialFailed
from remote.extract import TaskExtractor
from remote.plan import StagePlan, runtime_values, safe_name
from remote.recipe import FetchStage
from remote.rundir import write_private
from remote.slots import Slot
from remote.stages.context import EngineParts
from remote.template import render


class FetchStages:
    """The engine's fetch stages (a mixin of Engine)."""

    async def _fetch(self: EngineParts, stage: StagePlan) -> None:
        """Copy files from the hosts into fetched/<trial>/<host>/ and extract the metrics that name this stage."""
        spec = stage.spec
        assert isinstance(spec, FetchStage) and self.journal is not None and self.plan is not None
        folder = self.rd.path / "fetched" / (safe_name(stage.trial) or "_")
        for task in stage.tasks:
            host = (task.pinned_slot or "").rsplit(":", 1)[0]
            transport = self._transports[host]
            slot = next((s for s in self.plan.slots if s.key == task.pinned_slot), Slot(host=host, gpu=0))
            values = {**runtime_values(slot, attempt=1, task_id=task.id, run_dir=self.rd.path.resolve(),
                                       python=self._python_for(host)),
                      **self.loaded.recipe.variables, **stage.trial_values, **self._captures(),
                      "recipe_dir": str(self.plan.recipe_dir)}
            workdir = self.plan.hosts[host].workdir or transport.default_workdir()
            extractor = TaskExtractor(self._metrics, stage.name, done=None, progress=None)
            fetched: dict[str, bytes] = {}
            for template in spec.files:
                path = render(template, values)
                data = await transport.read_file(path, workdir, RESULT_FILE_LIMIT)
                if data is None:
                    if spec.required:
                        raise TrialFailed(f"host {host}: stage {stage.name}: {path} does not exist (in {workdir}); "
                                           "check that the previous stage wrote it")
                    self._note("warning", f"host {host}: {path} does not exist; skipped")
                    continue
                target = folder / host / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_private(target, data)
                fetched[path] = data
            for path_template, _what in extractor.file_metrics():
                path = render(path_template, values)
                data = fetched.get(path)
                if data is None:
                    data = await transport.read_file(path, workdir, RESULT_FILE_LIMIT)
                if data is not None:
                    extractor.feed_file(path_template, data)
            final = extractor.finish({**values, **task.values})
            with self.journal.transaction():
                self.journal.set_metrics(task.id, final)
                self.journal.set_task_state(task.id, "done", host=host, gpu=slot.gpu, started=time.time(),
                                            ended=time.time(), reason=f"fetched {len(fetched)} file(s)")
            self.journal.event("fetched", task.id, host=host, files=sorted(fetched))
        self._write_results(force=True)
