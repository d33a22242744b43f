"""`deploy.ray_actors.reserve` and `deploy.launch.connect` on a real local Ray instance: placement fails fast.

Ray's placement groups wait forever for resources that are missing; `reserve` fails at once when no
node could ever hold a bundle, and after its timeout when the resources exist but are taken. The
multi-node flow (start_cluster.sh, two nodes, actors on the labelled one) is tests/e2e/test_cluster.py.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from deploy import launch, ray_actors


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    assert not ray.is_initialized()
    ray.init(num_cpus=2, resources={"actor_node": 1}, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.timeout(300)  # a hang guard: waiting out the hour-long placement timeouts below would trip it
def test_a_resource_no_node_has_fails_at_once(local_ray: None) -> None:
    expected = r"^actor 0: no node has \{'CPU': 1.0, 'gpu_node': 1.0\} \(cluster: .*'actor_node': 1.0"
    with pytest.raises(ValueError, match=expected) as e:
        ray_actors.reserve([{"CPU": 1.0, "gpu_node": 1.0}], "actor 0", timeout_s=3600)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^learner \(3 rank\(s\)\): needs \{'CPU': 3.0\} in all"):
        ray_actors.reserve([{"CPU": 1.0}] * 3, "learner (3 rank(s))", timeout_s=3600)


def test_taken_resources_fail_after_the_timeout_and_free_ones_are_reserved(local_ray: None) -> None:
    import ray

    first = ray_actors.reserve([{"CPU": 1.0, "actor_node": 1.0}], "actor 0", timeout_s=60)
    try:
        assert ray.available_resources().get("actor_node", 0.0) == 0.0
        started = time.monotonic()
        expected = (
            r"^actor 1: \{'CPU': 1.0, 'actor_node': 1.0\} not free after 2 s "
            r"\(free now: \{'CPU': 1.0, 'actor_node': 0.0\}"
        )
        with pytest.raises(ValueError, match=expected):
            ray_actors.reserve([{"CPU": 1.0, "actor_node": 1.0}], "actor 1", timeout_s=2)
        assert time.monotonic() - started >= 2  # it waited the timeout out
        assert ray_actors.reserve([{}], "nothing", timeout_s=1) is None  # a zero request needs no group
    finally:
        ray.util.remove_placement_group(first)
    # the group was released: the same request fits again
    again = ray_actors.reserve([{"CPU": 1.0, "actor_node": 1.0}], "actor 1", timeout_s=60)
    ray.util.remove_placement_group(again)


@pytest.mark.timeout(120)  # a hang guard
def test_connect_to_nothing_is_one_line_and_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(ValueError, match=rf"^deploy.ray_address={address}: no Ray cluster there \(.+\)$"):
            launch.connect(address)
        with pytest.raises(ValueError, match=r"^--address="):
            launch.scale(2, address)
