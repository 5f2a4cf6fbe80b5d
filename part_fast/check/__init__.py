"""`part-fast check` (also `python -m part_fast.check`): proves and measures the GPU path in one command.

Four sections, each a list of checks with the figure it measured (runner.py records them):

1. environment (environment.py): versions, the GPU, which backends loaded and why one did not;
2. correctness on the device (correctness.py): every usable backend against the reference, opcheck,
   torch.compile(fullgraph=True);
3. models on the device (training.py): a CAM against the CPU's, a PART training step (AMP bf16,
   channels_last) whose budget equals a recomputation;
4. timings on the device (timing.py): the fused ops against the release's eager chain and its
   torch.compile, launches per PGD step, the CAM + budget stage, one training step of AT / PART / the release.

On the CPU it runs every section that applies (section 4 at CPU sizes). The exit code is 1 when any check
failed (a wrong result, or a measurement that crashed), else 0; the report says which.
"""
from .runner import CheckReport, Outcome, run_check

__all__ = ["CheckReport", "Outcome", "run_check"]
