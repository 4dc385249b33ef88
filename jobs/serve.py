# ray job submit --working-dir . --runtime-env-json "$TOKENS_ENV" -- python jobs/serve.py jobs/configs/serve-embed.yaml  # noqa: E501
"""Deploy a hybridray service: as a Ray job, as a plain script, or as a Serve application.

    TOKENS_ENV="{\"env_vars\": {\"HYBRIDRAY_SERVE_TOKENS\": \"$HYBRIDRAY_SERVE_TOKENS\"}}"
    ray job submit --working-dir . --runtime-env-json "$TOKENS_ENV" -- \
        python jobs/serve.py jobs/configs/serve-embed.yaml
    python jobs/serve.py jobs/configs/serve-embed.yaml http.port=8001       # plain script
    python jobs/serve.py jobs/configs/serve-lm.yaml --promote stdlib-gpt@v2  # one version only
    serve run jobs.serve:app config=jobs/configs/serve-embed.yaml cluster=local  # one Serve app

``eval "$(hybridray env local)"`` first points ``ray job submit`` at the cluster. The job
runs in the head node's environment, not your shell's: it reads bearer tokens from
``$HYBRIDRAY_SERVE_TOKENS`` of its runtime environment (``--runtime-env-json``; anyone
who holds the cluster token can read a job's runtime environment) or from
``auth.token_file=PATH`` of a file on the head node (one token per line). Errors print one
line and exit 2. As a job or script it deploys the service (one Serve application
per model version and site, plus the ingress; see hybridray/serve/service.py), waits until
it serves, prints the URL and exits; the service keeps running. ``app`` is an application
builder: ``serve run`` and ``serve deploy`` (``import_path: jobs.serve:app``, ``args:
{config: ..., cluster: ...}``) get the whole service as a single application with the same
placement and options.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def app(args: dict[str, Any]):
    """Application builder for ``serve run jobs.serve:app config=FILE [cluster=NAME]``."""
    from hybridray.serve.apps import service_app

    return service_app(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Deploy a hybridray service (serve file).")
    parser.add_argument("items", nargs="+", metavar="CONFIG|key=value")
    parser.add_argument("--promote", metavar="MODEL@VERSION",
                        help="send all traffic to VERSION and remove the model's others")
    parser.add_argument("--delete", action="store_true", help="remove the service")
    args = parser.parse_args(argv)
    files = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if len(files) != 1:
        parser.error("give one serve file, e.g. jobs/configs/serve-embed.yaml")

    import hybridray
    from hybridray.exceptions import HybridRayError
    from hybridray.serve import service as S
    from hybridray.serve.config import load_serve_config

    try:
        config = load_serve_config(files[0], overrides)
        cluster = hybridray.connect(config.cluster)
        if args.delete:
            print(f"removed: {', '.join(S.delete(config.name)) or 'nothing'}")
            return 0
        if args.promote:
            model, _, version = args.promote.partition("@")
            config = S._only(config, model, version)
        service = S.deploy(config, cluster=cluster,
                           progress=lambda line: print(line, flush=True))
    except HybridRayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for app_name, status in sorted(service.status().items()):
        for dep, d in status["deployments"].items():
            print(f"{app_name:<40} {dep:<28} {d['status']:<10} {d['replicas']}")
    print(f"OpenAI base URL: {service.url}/v1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
