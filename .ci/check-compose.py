#!/usr/bin/env python3
"""Checks docker-compose.yml where no Docker engine (or compose plugin) runs:
it parses, every service has an image, every file it mounts exists, every
service it depends on is defined, and the worker and broker are health-checked.
`docker compose config` does the parse too when it is available."""
import os
import sys

import yaml

root = os.path.join(os.path.dirname(__file__), "..")
with open(os.path.join(root, "docker-compose.yml")) as f:
    compose = yaml.safe_load(f)
problems = []
services = compose.get("services", {})
for name, svc in services.items():
    if "image" not in svc and "build" not in svc:
        problems.append(f"service {name}: no image and no build")
    for vol in svc.get("volumes", []):
        host = vol.split(":", 1)[0]
        if host.startswith(".") and not os.path.exists(os.path.join(root, host)):
            problems.append(f"service {name}: mounts {host}, which does not exist")
    deps = svc.get("depends_on", [])
    for dep in deps if isinstance(deps, list) else deps.keys():
        if dep not in services:
            problems.append(f"service {name}: depends on {dep}, which is not defined")
secrets = compose.get("secrets", {})
for name, secret in secrets.items():
    path = secret.get("file", "")
    if path.startswith(".") and not os.path.exists(os.path.join(root, path)):
        problems.append(f"secret {name}: reads {path}, which does not exist")
for name, svc in services.items():
    for secret in svc.get("secrets", []):
        source = secret if isinstance(secret, str) else secret.get("source")
        if source not in secrets:
            problems.append(f"service {name}: uses secret {source}, which is not defined")
cluster = [n for n, svc in services.items() if "cluster" in svc.get("profiles", [])]
if len([n for n in cluster if n.startswith("rmq")]) != 3:
    problems.append(f"the cluster profile should have three RabbitMQ nodes: {cluster}")
for name in ("rabbitmq", "worker", *cluster):
    if "healthcheck" not in services.get(name, {}):
        problems.append(f"service {name}: no healthcheck")
for name in ("rabbitmq", *[n for n in cluster if n.startswith("rmq")]):
    image = services.get(name, {}).get("image", "")
    if image.count(".") < 1:
        problems.append(f"{name} image {image!r} is not pinned to a minor version")
for p in problems:
    print(f"docker-compose.yml: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
