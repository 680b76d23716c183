"""The best checkpoint by a held-out metric (eval.best_metric): `<output_dir>/checkpoints/best/step-NNNNNN/`.

    best = BestCheckpoint(out / "checkpoints" / "best", "eval/greedy_pass@1")
    if best.improves(metrics):                 # after an evaluation; higher is better, ties keep the earlier
        best.record(step, metrics)
        trainer.save_checkpoint(best.root, keep=1, state={"eval_best": best.state()})

It is an ordinary checkpoint (rl/checkpoint.py: atomic, COMPLETE marker, loadable with --resume PATH) kept under
its own root, so the rotation of checkpoints/step-* (train.keep_checkpoints) never removes it; a new best
replaces it only once it is complete. Its trainer_state.json records the metric, the value and the step.

On resume the best so far is read back from that checkpoint. One written after the step resumed from belongs
to a run that is being redone (a crash after it, or --resume PATH back past it): it is removed, as
drop_later removes the ordinary ones, and the best is counted again from the resumed step. A crashed run
redone from its latest checkpoint repeats its evaluations (fixed seeds), so it writes the same best again.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from rl.checkpoint import drop_later, list_checkpoints

log = logging.getLogger("tandem")


class BestCheckpoint:
    def __init__(self, root: Path, metric: str):
        self.root, self.metric = Path(root), metric
        self.value: float | None = None
        self.step: int | None = None

    def improves(self, metrics: dict) -> bool:
        value = metrics.get(self.metric)
        value = value.item() if hasattr(value, "item") else value
        if value is None or not math.isfinite(value):
            return False
        return self.value is None or value > self.value

    def record(self, step: int, metrics: dict) -> None:
        self.step, self.value = step, float(metrics[self.metric])

    def state(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step}

    def restore(self, step: int, rank: int = 0) -> None:
        """After resuming at `step`: drop a best written later (rank 0), then take the kept one's value."""
        if rank == 0:
            dropped = drop_later(self.root, step)
            if dropped:
                log.info("removed the best checkpoint %s, written after step %d: the best is counted again from "
                         "there", ", ".join(dropped), step)
        found = [p for p in list_checkpoints(self.root) if int(p.name.removeprefix("step-")) <= step]
        if not found:
            return
        saved = json.loads((found[-1] / "trainer_state.json").read_text()).get("eval_best") or {}
        if saved.get("metric") != self.metric:  # eval.best_metric changed: the old best is not comparable
            log.info("the best checkpoint %s was chosen by %s, not %s: it is replaced at the next evaluation",
                     found[-1], saved.get("metric"), self.metric)
            return
        self.value, self.step = saved["value"], saved["step"]
