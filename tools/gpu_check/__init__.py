"""Check a node: does this install work here, and how fast is it? ``python -m tools.gpu_check``
(or ``make gpu-check``) runs each step in its own process and writes ``report.json`` and
``report.md``; runner.py has the usage, docs/GPU_CHECK.md the sizes and targets.

profiles: steps, sizes, time limits; report: the targets and the report files; runner: the command
line and the steps in order; steps: the steps run in a child process; trainer: the trainer's
measurements."""
