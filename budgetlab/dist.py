"""Who am I in the job: rank, world size and the rendezvous address (DESIGN section 7).

Three sources, checked in this order:
  1. torchrun / deepspeed launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
  2. a submitit job (SUBMITIT_EXECUTOR set: submitit's JobEnvironment, as its
     TorchDistributedEnvironment reads it) or a bare SLURM task (SLURM_PROCID, SLURM_NTASKS):
     ranks span every node of the allocation, MASTER_ADDR is the first host of the job's node
     list, the port is derived from the job id so that every task of the job (on every node)
     computes the same one without talking to the others;
  3. otherwise one process.
torch is imported lazily: the CLI imports this module on machines without torch.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

# Ports derived from job ids land in [_PORT_BASE, _PORT_BASE + _PORT_SPAN): above the usual
# service ports and below the Linux ephemeral range (32768+), so they rarely collide.
_PORT_BASE = 15000
_PORT_SPAN = 15000


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = "gloo"
    source: str = "single"  # where the values came from: torchrun, submitit, slurm, single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_dict(self) -> dict:
        return asdict(self)


def port_from_job_id(job_id: str) -> int:
    """A port every task of one job agrees on: a stable function of the job id."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return _PORT_BASE + int(digits) % _PORT_SPAN


def default_backend() -> str:
    try:
        import torch
    except ImportError:
        return "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def _int_env(name: str, env: dict) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list ("gpu[03-05,07],cpu1" -> "gpu03")."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # fall back to submitit's parser below
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)[0]


def from_environment(environ: dict | None = None) -> DistEnv:
    """The DistEnv of this process, from launcher, submitit or SLURM variables."""
    env = dict(os.environ if environ is None else environ)
    backend = env.get("BUDGETLAB_DIST_BACKEND") or default_backend()

    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int_env("RANK", env),
            world_size=_int_env("WORLD_SIZE", env),
            local_rank=_int_env("LOCAL_RANK", env) if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env("MASTER_PORT", env) if "MASTER_PORT" in env else 29500,
            backend=backend,
            source="torchrun",
        )

    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        world = _int_env("SUBMITIT_LOCAL_NTASKS", env) if "SUBMITIT_LOCAL_NTASKS" in env else 1
        return DistEnv(
            rank=_int_env("SUBMITIT_LOCAL_GLOBALID", env),
            world_size=world,
            local_rank=_int_env("SUBMITIT_LOCAL_LOCALID", env) if "SUBMITIT_LOCAL_LOCALID" in env else 0,
            master_addr="127.0.0.1",
            master_port=port_from_job_id(env.get("SUBMITIT_LOCAL_JOB_ID", "0")),
            backend=backend,
            source="submitit",
        )

    if env.get("SUBMITIT_EXECUTOR") == "slurm" and environ is None and "SLURM_PROCID" in env:
        # submitit's own view of the job (the same one TorchDistributedEnvironment uses):
        # global rank, tasks, local rank and the hosts of the allocation, across nodes.
        import submitit

        je = submitit.JobEnvironment()
        hosts = je.hostnames
        return DistEnv(
            rank=je.global_rank, world_size=je.num_tasks, local_rank=je.local_rank,
            master_addr=hosts[0] if hosts else "127.0.0.1",
            master_port=port_from_job_id(env.get("SLURM_JOB_ID", "0")),
            backend=backend, source="submitit",
        )

    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = env.get("SLURM_JOB_ID", "0")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        return DistEnv(
            rank=_int_env("SLURM_PROCID", env),
            world_size=_int_env("SLURM_NTASKS", env),
            local_rank=_int_env("SLURM_LOCALID", env) if "SLURM_LOCALID" in env else 0,
            master_addr=first_host(nodelist) if nodelist else "127.0.0.1",
            master_port=port_from_job_id(job_id),
            backend=backend,
            source="submitit" if env.get("SUBMITIT_EXECUTOR") == "slurm" else "slurm",
        )

    return DistEnv(backend=backend, source="single")


def init(env: DistEnv) -> None:
    """Join the process group (DeepSpeed's comm layer, which also sets up torch.distributed).

    The launcher variables are exported first so that DeepSpeed, and anything else that reads
    RANK/WORLD_SIZE, sees the same values whatever the source was.
    """
    import torch

    port = env.master_port
    if env.world_size == 1 and env.source == "single":
        port = _free_port()  # several single-process stages may share a machine
    os.environ.update({
        "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(port),
    })
    if env.backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False,
                                   verbose=False)


def process_rank() -> int:
    """This process's global rank (0 when it is not part of a distributed job), from the same
    sources as from_environment; never imports torch or calls scontrol."""
    env = os.environ
    for var in ("RANK", "SUBMITIT_LOCAL_GLOBALID", "SLURM_PROCID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return 0


def is_initialized() -> bool:
    try:
        import torch.distributed as td
    except ImportError:
        return False
    return td.is_available() and td.is_initialized()


def barrier() -> None:
    if is_initialized():
        import torch.distributed as td

        td.barrier()


def cleanup() -> None:
    if is_initialized():
        import torch.distributed as td

        td.destroy_process_group()
