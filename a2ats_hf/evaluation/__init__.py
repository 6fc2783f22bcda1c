"""The evaluation suite: long-context retrieval tasks in the style of RULER over real prose (:mod:`.tasks`), run
with full attention and with A2ATSCache under any scorer and budget (:mod:`.suite`)."""

from .suite import evaluate
from .tasks import TASKS, Sample, make_sample, score

__all__ = ["TASKS", "Sample", "evaluate", "make_sample", "score"]
