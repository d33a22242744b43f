"""The `vapo` command line: one sub-command per process or tool, each importing its code lazily.

Lives in `deploy/` because it is the one place allowed to reach into `shared`, `learner`
and `actors` alike. Sub-commands parse `CONFIG [key=value ...]` the same way everywhere
(`shared.config.load_config`), so a typo in any of them fails with the same one-line error.
Errors meant for the user (ValueError from config or data) print one line and exit 2; a run
that ends because one of its processes died (`deploy.cluster.RunFailed`, which names the
checkpoint to resume from) prints one line and exits 1, as does `vapo plan` when a configuration does
not fit its GPUs; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from deploy.cluster import RunFailed, progress_line


def _load(args: argparse.Namespace):  # -> VapoConfig, typed lazily to keep start-up light
    from shared.config import load_config

    return load_config(args.configs, args.overrides)


def _split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`a.yaml b.yaml k=v k2=v2` -> (files, overrides); a file may not contain '='."""
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    return files, overrides


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config_args",
        nargs="*",
        metavar="CONFIG|key=value",
        help="YAML files merged left to right, then key=value overrides",
    )


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved configuration (or, with --get KEY, one value of it)."""
    from shared.config import flatten, to_yaml

    cfg = _load(args)
    if args.get is None:
        print(to_yaml(cfg), end="")
        return 0
    values = flatten(cfg)
    if args.get not in values:
        raise ValueError(f"--get {args.get}: no such key")
    print(values[args.get])
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--get", metavar="KEY", default=None, help="print only this dotted key's value (e.g. run_dir)")
    _add_config_args(p)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory the run needs per learner rank and per actor GPU; exit 1 naming a term that does not fit."""
    from deploy.plan import make_plan, misfit, report_lines

    cfg = _load(args)
    plan = make_plan(cfg)
    print("\n".join(report_lines(plan)))
    problem = misfit(plan, cfg)
    if problem is not None:
        print(f"vapo plan: {problem}", file=sys.stderr)
        return 1
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    """Build (or find cached) the tiny model and print its directory."""
    from learner.tiny_model import build_tiny_model, default_tiny_model_dir

    out = Path(args.out) if args.out else default_tiny_model_dir()
    print(build_tiny_model(out, seed=args.seed))
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    """Write the built-in arithmetic task as a dataset file in the users' row format (jsonl or parquet)."""
    from shared.data.tasks import arithmetic

    out = Path(args.out)
    if out.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"output {args.out!r} must end in .jsonl or .parquet")
    problems = arithmetic.generate(args.num, args.seed, args.split)
    write = arithmetic.write_jsonl if out.suffix == ".jsonl" else arithmetic.write_parquet
    print(write(problems, out))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train: a local Ray instance (or deploy.ray_address) with the queue, learner rank(s) and actors."""
    import logging

    from deploy.launch import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    summary = train(_load(args))
    stats = summary["queue_stats"]
    print(f"done: {summary['steps']} steps, policy version {summary['version']}, MLflow run {summary['run_id']}")
    if stats is not None:
        print(
            f"queue: leased {stats.leased} consumed {stats.consumed} dropped_stale {stats.dropped_stale} "
            f"filtered {stats.filtered} identity holds: {stats.identity_holds()}"
        )
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    """Change the number of actors of the running job."""
    from deploy.launch import scale

    print(scale(args.num_actors, args.address))
    return 0


def _scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("num_actors", type=int)
    p.add_argument("--address", default="auto", help="Ray cluster address")


def cmd_status(args: argparse.Namespace) -> int:
    """Print the cluster's nodes and resources and the running job's actors, placements and last step."""
    import json

    from deploy.launch import cluster_status

    status = cluster_status(args.address)
    print(json.dumps(status, default=str) if args.json else "\n".join(_status_lines(status)))
    return 0


def _status_lines(status: dict) -> list[str]:
    """Human-readable `vapo status`: one line for the cluster, one per node, then the job."""
    nodes = [n for n in status["nodes"] if n["alive"]]
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n["resources"].items():
            total[k] = total.get(k, 0.0) + v
    shown = [k for k in sorted(total) if "memory" not in k and not k.startswith("node:")]
    free = ", ".join(f"{k} {status['available'].get(k, 0.0):g}/{total[k]:g}" for k in shown)
    lines = [f"cluster: {len(nodes)} node(s); free/total: {free}"]
    for n in nodes:
        res = ", ".join(f"{k} {v:g}" for k, v in sorted(n["resources"].items()) if k in shown)
        head = " (head)" if "node:__internal_head__" in n["resources"] else ""
        lines.append(f"  node {n['node_id'][:8]} {n['ip']}{head}: {res}")
    job = status["job"]
    if job is None:
        return [*lines, "job: none running"]
    where = ", ".join(f"{a}@{(node or 'starting')[:8]}" for a, node in sorted(job["actor_nodes"].items()))
    lines.append(f"job: {len(job['actors'])} actor(s) [{where}], {job['restarts']} restart(s)")
    lines.append(f"  {progress_line(job['progress'])}" if job["progress"] else "  no learner step yet")
    return lines


def cmd_stop_nodes(args: argparse.Namespace) -> int:
    """Stop the driver and the Ray processes of the nodes started with these temp dirs (not `ray stop`)."""
    from deploy.cluster import stop_nodes

    pids, killed = stop_nodes(args.temp_dirs, address=args.address, driver_pid=args.driver_pid, grace_s=args.grace)
    print(f"stopped {len(pids)} process(es)" + (f", {len(killed)} of them with SIGKILL" if killed else ""))
    return 0


def _stop_nodes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("temp_dirs", nargs="+", metavar="TEMP_DIR", help="the --temp-dir of each node started here")
    p.add_argument("--address", default=None, help="the head's GCS address (stops its Ray client server too)")
    p.add_argument("--driver-pid", type=int, default=None, help="the job's driver, stopped first (SIGTERM)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto", help="Ray cluster address")
    p.add_argument("--json", action="store_true", help="print the status as JSON")


def cmd_doctor(args: argparse.Namespace) -> int:
    """Run a health check; `weight-sync` pushes perturbed weights into vLLM and compares log-probs."""
    from deploy.doctor import cmd_weight_sync

    return cmd_weight_sync(
        args.model,
        tolerance=args.tolerance,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype,
    )


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint's policy as a Hugging Face directory."""
    from learner.checkpoint import export_policy

    print(export_policy(args.checkpoint, args.out_dir))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Draw a finished run's training curves (reward, accuracy, length, entropy, version lag) into PNG files."""
    from shared.config import TrackingConfig
    from shared.tracking.plots import PLOT_KEYS, write_plots
    from shared.tracking.tracker import metric_history

    uri = args.tracking_uri or TrackingConfig().resolved_uri
    history = metric_history(args.run_id, list(PLOT_KEYS), uri)
    for path in write_plots(history, args.out or f"report_{args.run_id}", title=f"run {args.run_id}"):
        print(path)
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    """Run the replay queue service until SIGTERM/SIGINT."""
    from shared.data.source import open_prompt_source
    from shared.queue.service import serve

    cfg = _load(args)
    stats = serve(cfg, open_prompt_source(cfg))
    print(stats)
    return 0


def _doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("check", choices=["weight-sync"])
    p.add_argument("--model", default="builtin:tiny", help="model directory, or builtin:tiny")
    p.add_argument("--tolerance", type=float, default=None, help="max abs log-prob diff (default: the dtype's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the engine's and the push's")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory (RUN_DIR/checkpoints/step_N)")
    p.add_argument("out_dir")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", help="MLflow run id (printed at the end of vapo train)")
    p.add_argument("--out", default=None, help="output directory (default: report_RUN_ID)")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)"
    )


def _make_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="OUT.jsonl or OUT.parquet")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--seed", type=int, default=0)


def _tiny_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output directory (default: the cache directory)")
    p.add_argument("--seed", type=int, default=0)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]] = {
    "train": (cmd_train, _add_config_args, "train (queue, learner ranks and actors on Ray)"),
    "scale": (cmd_scale, _scale_args, "change the number of actors of the running job"),
    "status": (cmd_status, _status_args, "the Ray cluster's nodes and resources, and the running job"),
    "stop-nodes": (cmd_stop_nodes, _stop_nodes_args, "stop the Ray nodes started here with these temp dirs"),
    "config": (cmd_config, _config_args, "print the resolved configuration"),
    "plan": (cmd_plan, _add_config_args, "the memory a run needs per learner GPU and actor GPU (deploy.gpu_memory_gb)"),
    "queue": (cmd_queue, _add_config_args, "run the replay queue service"),
    "make-tiny-model": (cmd_make_tiny_model, _tiny_args, "build the tiny Qwen2-style model and its tokenizer"),
    "make-data": (cmd_make_data, _make_data_args, "write the built-in arithmetic task as a jsonl/parquet dataset"),
    "doctor": (cmd_doctor, _doctor_args, "health checks (weight-sync: vLLM log-prob parity after a push)"),
    "export": (cmd_export, _export_args, "export a checkpoint's policy as a Hugging Face directory"),
    "report": (cmd_report, _report_args, "draw a finished run's training curves into PNG files"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vapo", description="Asynchronous actor-learner RL with VAPO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_args, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "config_args"):
        args.configs, args.overrides = _split_config_args(args.config_args)
    handler = COMMANDS[args.command][0]
    try:
        return handler(args)
    except ValueError as e:
        print(f"vapo {args.command}: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"vapo {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
