"""`memstream serve`: the serving application on its own, following a snapshot store.

Serving does not need a training job: it follows a store (LATEST, or PINNED after a
rollback) written by whichever job writes it, on any pyarrow filesystem, and outlives
that job's restarts. It waits (/rank answers 503) while the store has no version yet.
This is the same application a Serve config or a KubeRay RayService deploys
(`import_path: stream.serving.app:build_app`, infra/k8s/rayservice.yaml) and the one
`memstream run` embeds; a job that finds it running uses it and never deletes it.

The arguments function is argparse only (stream/cli/main.py imports it for every
command); Ray and Serve are imported when the command runs.
"""

from __future__ import annotations

import argparse

DEFAULT_APP_NAME = "memstream"  # stream/job/driver.py's SERVING_APP: the job finds it


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--snapshots",
        required=True,
        metavar="URI",
        help="snapshot store to follow: a local path or a pyarrow filesystem URI (s3://, gs://, file://)",
    )
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host of Serve's proxy (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of Serve's proxy (default 8000)")
    p.add_argument("--route", default="/", help="route prefix: /rank and /version below it (default /)")
    p.add_argument(
        "--name", default=DEFAULT_APP_NAME, help=f"Serve application name (default {DEFAULT_APP_NAME})"
    )
    p.add_argument(
        "--ray-address", help="join this Ray cluster ('auto': the running one); default: a local Ray"
    )
    p.add_argument(
        "--namespace",
        default="memstream",
        help="Ray namespace of the job writing the store (job.namespace), for its serving ledger",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="with --ray-address: deploy and return, leaving the app running on the cluster",
    )
    p.add_argument(
        "--log-dir", default=".memstream/serve/logs", help="log files (default .memstream/serve/logs)"
    )
    p.add_argument("--verbose", action="store_true", help="Ray's and Serve's logs on the console too")
    add_overrides_argument(
        p, "a serving field, e.g. --set max_in_flight=16 (stream/serving/follower.py ServingConfig)"
    )


def add_overrides_argument(p: argparse.ArgumentParser, help_text: str) -> None:
    """`--set KEY=VALUE`, repeatable, into args.overrides (run's and serve's)."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def _app_args(args: argparse.Namespace) -> dict:
    """The builder's args from the flags, validated (a bad one names its field)."""
    import yaml
    from pydantic import ValidationError

    from stream.config import ConfigError
    from stream.serving.app import ServingAppArgs

    serving: dict = {
        "replicas": args.replicas,
        "http_host": args.host,
        "http_port": args.port,
        "route_prefix": args.route,
    }
    for item in args.overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected field=value")
        serving[key.strip().removeprefix("serving.")] = yaml.safe_load(text)  # YAML scalars
    try:
        parsed = ServingAppArgs.model_validate(
            {"snapshots": args.snapshots, "serving": serving, "namespace": args.namespace}
        )
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        raise ConfigError(f"invalid serving argument {field}: {first.get('msg')}") from None
    return parsed.model_dump()


def serve_main(args: argparse.Namespace) -> int:
    import signal
    import threading
    from pathlib import Path

    from stream.errors import MemstreamError
    from stream.job.display import ConsoleLog
    from stream.job.preflight import check_store

    if args.detach and not args.ray_address:
        raise MemstreamError("--detach needs --ray-address: a local Ray stops with this command")
    app_args = _app_args(args)
    check_store(app_args["snapshots"])  # seconds, before Ray starts
    console = ConsoleLog(Path(args.log_dir), quiet=not args.verbose)
    console.install()

    import ray
    from ray import serve

    from stream.job.driver import init_local_ray
    from stream.serving.app import build_app
    from stream.snapshots.store import SnapshotStore

    init_local_ray(address=args.ray_address, namespace=args.namespace, **console.ray_init_options())
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    console.after_ray_init(session_dir)
    reaper = None
    if args.ray_address is None:  # ours: stopped with this command, even one that is killed
        from stream.job.reaper import LocalRayReaper

        reaper = LocalRayReaper(session_dir)
    sc = app_args["serving"]
    url = f"http://{sc['http_host']}:{sc['http_port']}{sc['route_prefix'].rstrip('/')}"
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(
            http_options={"host": sc["http_host"], "port": sc["http_port"]},
            logging_config=console.serve_logging(),
        )
        serve.run(build_app(app_args), name=args.name, route_prefix=sc["route_prefix"], blocking=False)
        console.adopt_ray_loggers()  # serve.start gave Serve's logger its own handler
        print(
            f"memstream serve: {url}/rank ({sc['replicas']} replica(s), app {args.name!r}) "
            f"following {app_args['snapshots']}",
            flush=True,
        )
        if args.detach:
            print(f"memstream serve: detached; stop it with `serve delete {args.name}`", flush=True)
            return 0
        _follow(SnapshotStore(app_args["snapshots"]), serve.get_app_handle(args.name), stop)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if not args.detach:
            try:
                serve.delete(args.name)  # a local Ray then goes as a whole (no serve.shutdown)
            finally:
                ray.shutdown()
                if reaper is not None:
                    reaper.release()
    return 0


def _follow(store, handle, stop) -> None:
    """Until stopped: one line when the store is still empty, one per version going live."""
    said_waiting, shown = False, None
    while not stop.wait(1.0):
        if store.latest_version() is None:
            if not said_waiting:
                print(
                    f"memstream serve: waiting for the first snapshot in {store.uri} "
                    "(/rank answers 503 until one is published)",
                    flush=True,
                )
                said_waiting = True
            continue
        try:
            state = handle.version.remote().result(timeout_s=5)
        except Exception:  # a replica restarting or busy: ask again next second
            continue
        if state.get("version") is not None and state["version"] != shown:
            shown = state["version"]
            pinned = f" (pinned to v{state['pinned']})" if state.get("pinned") is not None else ""
            print(f"memstream serve: serving v{shown}{pinned}", flush=True)
