"""Imported by each worker process of a private Ray instance as it boots, before Ray places an actor
on it (Ray's worker preload; jobs.cluster.lean_raylet asks for it). The process would otherwise sit
idle while the driver finishes connecting and places the actor, and only then import torch (~0.8 s):
now that import has begun by then. Outside the cycle collector's reach, as the load itself is."""

from bulkscore.workers.actor import collector_paused

try:
    with collector_paused():
        from bulkscore.workers.models import pin_kernels

        pin_kernels()
except Exception:  # Ray would end the process over it; the actor's load meets it again and reports it
    pass
