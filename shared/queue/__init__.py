"""The replay queue's public face: `serve` runs it, `ActorClient` and `LearnerClient` talk to it.

The queue is split by concern (DESIGN.md section 1 has the picture):
- `shared/queue/state.py`: leases, admission control, staleness gate, group filter, cursor,
  accounting; pure, unit-tested without sockets;
- `shared/queue/service.py`: the socket loop, its requests and its failure modes;
- `shared/queue/client.py`: the actor's and the learner's clients;
- `shared/queue/transport.py`: ZeroMQ (the only importer of zmq); `shared/wire.py`: the bytes.

Embedding in the learner: run `serve(cfg, source, stop_event=ev, cursor=..., initial_version=...)`
in a thread and set `ev` to stop it; as a process (`vapo queue`), SIGTERM/SIGINT stop it.
"""

from shared.queue.client import ActorClient, Batch, Broadcast, ClientSettings, LearnerClient
from shared.queue.service import QueueService, serve
from shared.queue.state import PromptSourceLike, QueueState
from shared.types import Lease, LeaseReply, QueueStats, RolloutGroup

__all__ = [
    "ActorClient", "Batch", "Broadcast", "ClientSettings", "Lease", "LeaseReply", "LearnerClient", "PromptSourceLike",
    "QueueService", "QueueState", "QueueStats", "RolloutGroup", "serve",
]
