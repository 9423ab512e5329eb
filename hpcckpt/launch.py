"""The launch check (SPEC 3): refuse to run when the launcher and the MPI world disagree."""
from __future__ import annotations

import os

from .errors import LaunchError

_SIZE_VARS = ("SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


def check_launch(world_size: int, environ=os.environ) -> None:
    """E.g. ``SLURM_NTASKS=8`` with a world of 1 means the command was not started by srun
    (or mpi4py is linked to another MPI than the launcher's): every process would do the
    whole job alone. ``HPCCKPT_SKIP_LAUNCH_CHECK=1`` turns the check off."""
    if environ.get("HPCCKPT_SKIP_LAUNCH_CHECK") == "1":
        return
    for var in _SIZE_VARS:
        value = environ.get(var)
        if value and value.isdigit() and int(value) != world_size:
            raise LaunchError(
                f"{var}={value} but the MPI world has {world_size} rank(s): launch with "
                f"`srun` or `mpiexec -n {value}` using the MPI that mpi4py was built against "
                "(or set HPCCKPT_SKIP_LAUNCH_CHECK=1)")
