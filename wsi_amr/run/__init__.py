"""Running a command over many slides: the task a slide becomes (``task``), the inputs it comes
from (``inputs``), what already ran (``manifest``), one task in a worker (``worker``), the
batch over local processes or a cluster (``runner``, ``cluster``), progress, and the process
resources a job shares (``resources``). Jobs are loaded by name, so ``run`` imports no job.
"""
