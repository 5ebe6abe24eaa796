"""Checks docker-compose.yml beyond the Compose schema, without a Docker engine.

The schema (check-jsonschema's vendored compose-spec) says each key is
valid; this says the file hangs together: every depends_on names a service,
every named volume and network is declared, every build context has its
Dockerfile, and the KurrentDB cluster nodes seed each other.
"""

import pathlib
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent.parent
compose = yaml.safe_load((root / "docker-compose.yml").read_text())
services = compose["services"]
volumes = set(compose.get("volumes") or {})
networks = set(compose.get("networks") or {}) | {"default"}
problems = []

for name, service in services.items():
    if "image" not in service and "build" not in service:
        problems.append(f"{name}: neither image nor build")
    build = service.get("build")
    if build:
        context = root / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not dockerfile.is_file():
            problems.append(f"{name}: {dockerfile} does not exist")
    for dependency in service.get("depends_on") or {}:
        if dependency not in services:
            problems.append(f"{name}: depends on unknown service {dependency}")
    for mount in service.get("volumes") or []:
        source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
        if source and not source.startswith((".", "/")) and source not in volumes:
            problems.append(f"{name}: volume {source} is not declared")
    for network in service.get("networks") or {}:
        if network not in networks:
            problems.append(f"{name}: network {network} is not declared")

# `triage demo` ignores TRIAGE_STORE and TRIAGE_DB: a demo service must name
# its store on the command line, or it runs on a throw-away SQLite file.
for name, service in services.items():
    command = service.get("command") or []
    if isinstance(command, str):
        command = command.split()
    if "demo" in command and not {"--store", "--db"} & set(command[: command.index("demo")]):
        problems.append(f"{name}: runs the demo without --store or --db before it (the demo ignores TRIAGE_STORE)")

nodes = {name: s for name, s in services.items() if "cluster" in (s.get("profiles") or [])}
addresses = {s["networks"]["cluster"]["ipv4_address"] for s in nodes.values()}
if len(nodes) != 3:
    problems.append(f"the cluster profile has {len(nodes)} nodes, not 3")
for name, node in nodes.items():
    own = node["networks"]["cluster"]["ipv4_address"]
    seeds = {seed.split(":")[0] for seed in node["environment"]["KURRENTDB_GOSSIP_SEED"].split(",")}
    if seeds != addresses - {own}:
        problems.append(f"{name}: gossip seeds {sorted(seeds)} are not the other two nodes")
    if node["environment"]["KURRENTDB_REPLICATION_IP"] != own:
        problems.append(f"{name}: replication IP is not its own address {own}")

if problems:
    print("docker-compose.yml:", *problems, sep="\n  ")
    sys.exit(1)
print(f"docker-compose.yml: {len(services)} services hang together")
