"""The evaluation suite: long-context retrieval tasks in the style of RULER over real prose (:mod:`.tasks`), run
with full attention and with A2ATSCache under any scorer and budget (:mod:`.suite`), and perplexity of held-out text
with the attention fidelity of every layer (:mod:`.perplexity`, :mod:`.fidelity`)."""

from .perplexity import evaluate_perplexity, tail_nll
from .suite import Method, evaluate
from .tasks import TASKS, Sample, make_sample, score

__all__ = ["TASKS", "Method", "Sample", "evaluate", "evaluate_perplexity", "make_sample", "score", "tail_nll"]
