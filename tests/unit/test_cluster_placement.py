"""The pure side of multi-node placement: bundles, the could-never-fit check, status lines, deploy config keys."""

from __future__ import annotations

import socket

import pytest

from deploy.cli import _status_lines
from deploy.cluster import check_address, placement_problem, resource_bundle, total_request
from shared.config import load_config


def _node(node_id: str, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": "10.0.0.1", "Alive": alive, "Resources": resources}


HEAD = _node("aaaaaaaa11", CPU=1.0, learner_node=1.0, memory=1e9, **{"node:10.0.0.1": 1.0})
WORKER = _node("bbbbbbbb22", CPU=2.0, actor_node=2.0, object_store_memory=1e9)


def test_bundle_keeps_only_what_is_requested() -> None:
    assert resource_bundle(1, 0, {}) == {"CPU": 1.0}
    assert resource_bundle(2, 0.5, {"actor_node": 1}) == {"CPU": 2.0, "GPU": 0.5, "actor_node": 1.0}
    assert resource_bundle(0, 0, {"x": 0}) == {}
    assert total_request([{"CPU": 1.0}, {"CPU": 1.0, "a": 1.0}]) == {"CPU": 2.0, "a": 1.0}


def test_placeable_bundles_have_no_problem() -> None:
    nodes = [HEAD, WORKER]
    assert placement_problem([{"CPU": 1.0, "actor_node": 1.0}] * 2, nodes) is None
    assert placement_problem([{"CPU": 1.0, "learner_node": 1.0}], nodes) is None
    assert placement_problem([{"CPU": 1.0}] * 3, nodes) is None  # spread over both nodes


def test_a_resource_no_node_has_is_named_with_what_each_node_has() -> None:
    problem = placement_problem([{"CPU": 1.0, "gpu_node": 1.0}], [HEAD, WORKER])
    assert problem is not None and "no node has {'CPU': 1.0, 'gpu_node': 1.0}" in problem
    assert "bbbbbbbb {'CPU': 2.0, 'actor_node': 2.0}" in problem  # memory and node: entries left out
    # a bundle larger than any one node, though the cluster has enough in all
    assert placement_problem([{"CPU": 3.0}], [HEAD, WORKER]) is not None


def test_more_than_the_cluster_has_in_all() -> None:
    problem = placement_problem([{"CPU": 1.0, "actor_node": 1.0}] * 3, [HEAD, WORKER])
    assert problem is not None and "needs {'CPU': 3.0, 'actor_node': 3.0} in all" in problem
    assert "'actor_node': 2.0" in problem


def test_dead_nodes_do_not_count() -> None:
    dead_worker = dict(WORKER, Alive=False)
    assert placement_problem([{"actor_node": 1.0}], [HEAD, dead_worker]) is not None
    assert "no live node" in (placement_problem([{"CPU": 1.0}], []) or "")


def test_nothing_listening_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ValueError, match=rf"^--address=127.0.0.1:{port}: no Ray cluster there \(.+\)$"):
            check_address(f"127.0.0.1:{port}", "--address")
    check_address("auto", "--address")  # left to Ray
    check_address("ray://127.0.0.1:1", "--address")


def test_deploy_resource_keys() -> None:
    cfg = load_config([], ["deploy.actor_resources.actor_node=1", "deploy.learner_resources={learner_node: 2}"])
    assert cfg.deploy.actor_resources == {"actor_node": 1.0}
    assert cfg.deploy.learner_resources == {"learner_node": 2.0}
    default = load_config().deploy
    assert default.actor_resources == {} and default.learner_resources == {} and default.placement_timeout_s == 60
    with pytest.raises(ValueError, match=r"deploy.actor_resources.GPU is a built-in Ray resource"):
        load_config([], ["deploy.actor_resources.GPU=1"])
    with pytest.raises(ValueError, match=r"deploy.learner_resources.x must be >= 0"):
        load_config([], ["deploy.learner_resources.x=-1"])
    with pytest.raises(ValueError, match=r"deploy.placement_timeout_s must be > 0"):
        load_config([], ["deploy.placement_timeout_s=0"])


def test_status_lines() -> None:
    nodes = [
        {"node_id": n["NodeID"], "ip": "10.0.0.1", "alive": True, "resources": n["Resources"]} for n in (HEAD, WORKER)
    ]
    nodes[0]["resources"] = {**nodes[0]["resources"], "node:__internal_head__": 1.0}
    available = {"CPU": 1.0, "learner_node": 0.0, "actor_node": 1.0}
    lines = _status_lines({"nodes": nodes, "available": available, "job": None})
    assert lines[0] == "cluster: 2 node(s); free/total: CPU 1/3, actor_node 1/2, learner_node 0/1"
    assert lines[1] == "  node aaaaaaaa 10.0.0.1 (head): CPU 1, learner_node 1"
    assert lines[2] == "  node bbbbbbbb 10.0.0.1: CPU 2, actor_node 2"
    assert lines[3] == "job: none running"
    job = {"actors": [0, 1], "restarts": 1, "actor_nodes": {0: "bbbbbbbb22", 1: None}, "progress": {}}
    lines = _status_lines({"nodes": nodes, "available": available, "job": job})
    assert lines[3:] == ["job: 2 actor(s) [0@bbbbbbbb, 1@starting], 1 restart(s)", "  no learner step yet"]
    job["progress"] = {"train/version": 7.0, "rollout/reward_mean": -0.5, "rollout/acc": 0.25}
    assert _status_lines({"nodes": nodes, "available": available, "job": job})[-1].startswith(
        "  step 7 | reward -0.500 | acc 0.250"
    )


def test_a_run_that_failed_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from deploy import cli
    from deploy.cluster import RunFailed

    def failing(args: object) -> int:
        raise RunFailed("learner rank 0 died (killed); resume=true continues from runs/x/step_000004")

    def buggy(args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "train", (failing, *cli.COMMANDS["train"][1:]))
    assert cli.main(["train", "configs/tiny_cpu.yaml"]) == 1
    assert capsys.readouterr().err == ("vapo train: learner rank 0 died (killed); "
                                       "resume=true continues from runs/x/step_000004\n")
    monkeypatch.setitem(cli.COMMANDS, "train", (buggy, *cli.COMMANDS["train"][1:]))
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        cli.main(["train", "configs/tiny_cpu.yaml"])
