#!/usr/bin/env python3
"""Checks deploy/kubernetes without a cluster.

1. Every resource of a kind Kubernetes defines validates (strict: no
   unknown field) against the API schemas of Kubernetes 1.30 (the oldest
   with the kubelet's preStop sleep) and of the newest that
   kubernetes-validate knows, with kubernetes-validate from PyPI.
2. The pieces fit: kustomization.yaml lists files that exist, the
   Deployment's selector, the Service, the PodDisruptionBudget, the
   ServiceMonitor and the ScaledObject/HPA all point at one another, the
   Secret holds every key the Deployment reads, the probes use the admin
   port, terminationGracePeriodSeconds covers preStop + shutdown_grace,
   and the autoscalers read rabbit_guard_scalable_backlog.
The worker's config (rabbit-guard.toml) is checked by the binary itself
(`rabbit-guard check-config`, run by .ci/run).
Usage: check-kubernetes.py KUBERNETES_VALIDATE"""
import os
import re
import subprocess
import sys

import yaml

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "deploy", "kubernetes")
validate = sys.argv[1] if len(sys.argv) > 1 else "kubernetes-validate"
problems = []


def load(name):
    with open(os.path.join(root, name)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if len(docs) != 1:
        problems.append(f"{name}: expected one resource, found {len(docs)}")
    return docs[0] if docs else {}


kustomization = load("kustomization.yaml")
files = sorted(f for f in os.listdir(root) if f.endswith(".yaml") and f != "kustomization.yaml")
for name in kustomization.get("resources", []):
    if not os.path.exists(os.path.join(root, name)):
        problems.append(f"kustomization.yaml: lists {name}, which does not exist")
for gen in kustomization.get("configMapGenerator", []):
    for name in gen.get("files", []):
        if not os.path.exists(os.path.join(root, name)):
            problems.append(f"kustomization.yaml: configMapGenerator reads {name}, which does not exist")

res = {name: load(name) for name in files}
by_kind = {}
for name, doc in res.items():
    by_kind.setdefault(doc.get("kind"), []).append((name, doc))
core = [n for n, d in res.items() if "." not in d.get("apiVersion", "").split("/")[0] or d.get("apiVersion", "").startswith(("apps/", "policy/", "autoscaling/"))]

# 1. The API schemas.
for version in ("1.30.0", None):
    args = [validate, "--strict", "--quiet"] + (["-k", version] if version else []) + [os.path.join(root, n) for n in core]
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode != 0:
        problems.append(f"kubernetes-validate {version or '(newest)'}:\n{run.stdout}{run.stderr}")
    else:
        print(f"kubernetes-validate --strict {version or '(newest schema)'}: {', '.join(core)} pass")

# 2. The pieces fit.
def one(kind):
    found = by_kind.get(kind, [])
    if len(found) != 1:
        problems.append(f"expected one {kind}, found {[n for n, _ in found]}")
        return {}
    return found[0][1]


deployment = one("Deployment")
labels = deployment.get("spec", {}).get("selector", {}).get("matchLabels", {})
pod = deployment.get("spec", {}).get("template", {})
if not labels or any(pod.get("metadata", {}).get("labels", {}).get(k) != v for k, v in labels.items()):
    problems.append("Deployment: the pod template's labels do not match its selector")
spec = pod.get("spec", {})
container = (spec.get("containers") or [{}])[0]
ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
if ports.get("admin") != 9090:
    problems.append(f"Deployment: no admin port 9090: {ports}")
for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
    get = container.get(probe, {}).get("httpGet", {})
    if get.get("port") not in ("admin", 9090):
        problems.append(f"Deployment: {probe} does not use the admin port")
if container.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
    problems.append("Deployment: liveness must be /healthz")
if container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
    problems.append("Deployment: readiness must be /readyz")
sec = container.get("securityContext", {})
if not (spec.get("securityContext", {}).get("runAsNonRoot") and sec.get("readOnlyRootFilesystem") and sec.get("allowPrivilegeEscalation") is False):
    problems.append("Deployment: must run as non-root, read-only root filesystem, no privilege escalation")
if "memory" not in container.get("resources", {}).get("limits", {}) or "memory" not in container.get("resources", {}).get("requests", {}):
    problems.append("Deployment: memory request and limit")

with open(os.path.join(root, "rabbit-guard.toml")) as f:
    toml = f.read()
m = re.search(r'^shutdown_grace\s*=\s*"(\d+)s"', toml, re.M)
grace = int(m.group(1)) if m else None
pre = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
term = spec.get("terminationGracePeriodSeconds", 30)
if grace is None:
    problems.append('rabbit-guard.toml: worker.shutdown_grace must be set in seconds ("30s")')
elif term < pre + grace + 5:
    problems.append(f"Deployment: terminationGracePeriodSeconds {term} < preStop {pre} + shutdown_grace {grace} + 5")
m = re.search(r'^token_file\s*=\s*"([^"]+)"', toml, re.M)
mounts = {v.get("name"): v.get("mountPath") for v in container.get("volumeMounts", [])}
volumes = {v.get("name"): v for v in spec.get("volumes", [])}
if not m or not any(m.group(1).startswith(p + "/") for p in mounts.values()):
    problems.append("rabbit-guard.toml: admin.token_file is not on a mounted volume")
if not re.search(r'^listen\s*=\s*"0\.0\.0\.0:9090"', toml, re.M):
    problems.append('rabbit-guard.toml: admin.listen must be "0.0.0.0:9090" (the probes reach the pod\'s IP)')
config_args = container.get("args", [])
if "--config" not in config_args or not config_args[config_args.index("--config") + 1].startswith(mounts.get("config", "?") + "/"):
    problems.append("Deployment: --config does not point into the config volume")
cm_names = [g.get("name") for g in kustomization.get("configMapGenerator", [])]
if volumes.get("config", {}).get("configMap", {}).get("name") not in cm_names:
    problems.append("Deployment: the config volume is not the generated ConfigMap")

secret = one("Secret")
keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
wanted = set()
for env in container.get("env", []):
    ref = env.get("valueFrom", {}).get("secretKeyRef")
    if ref:
        if ref.get("name") != secret.get("metadata", {}).get("name"):
            problems.append(f"Deployment: env {env.get('name')} reads Secret {ref.get('name')}, not defined here")
        wanted.add(ref.get("key"))
for v in volumes.values():
    if "secret" in v:
        wanted |= {i.get("key") for i in v["secret"].get("items", [])}
if not wanted <= keys:
    problems.append(f"Secret: lacks {sorted(wanted - keys)}")

service = one("Service")
if service.get("spec", {}).get("selector") != labels:
    problems.append("Service: its selector is not the Deployment's")
sport = (service.get("spec", {}).get("ports") or [{}])[0]
if sport.get("targetPort") not in ("admin", 9090) or sport.get("name") != "admin":
    problems.append("Service: port admin -> admin")
pdb = one("PodDisruptionBudget")
if pdb.get("spec", {}).get("selector", {}).get("matchLabels") != labels:
    problems.append("PodDisruptionBudget: its selector is not the Deployment's")
monitor = one("ServiceMonitor")
if monitor.get("apiVersion") != "monitoring.coreos.com/v1":
    problems.append("ServiceMonitor: apiVersion monitoring.coreos.com/v1")
if not labels.items() <= monitor.get("spec", {}).get("selector", {}).get("matchLabels", {}).items():
    problems.append("ServiceMonitor: does not select the Service")
if [e.get("port") for e in monitor.get("spec", {}).get("endpoints", [])] != ["admin"]:
    problems.append("ServiceMonitor: scrapes the admin port")
scaled = one("ScaledObject")
if scaled.get("apiVersion") != "keda.sh/v1alpha1":
    problems.append("ScaledObject: apiVersion keda.sh/v1alpha1")
sspec = scaled.get("spec", {})
if sspec.get("scaleTargetRef", {}).get("name") != deployment.get("metadata", {}).get("name"):
    problems.append("ScaledObject: does not scale the Deployment")
if not (1 <= sspec.get("minReplicaCount", 0) <= sspec.get("maxReplicaCount", 0)):
    problems.append("ScaledObject: minReplicaCount >= 1 (a paused queue still needs a worker) and <= maxReplicaCount")
triggers = sspec.get("triggers", [])
if not triggers or any(t.get("type") != "prometheus" or "rabbit_guard_scalable_backlog" not in t.get("metadata", {}).get("query", "") or not t.get("metadata", {}).get("threshold") for t in triggers):
    problems.append("ScaledObject: a prometheus trigger on rabbit_guard_scalable_backlog with a threshold")
hpa = one("HorizontalPodAutoscaler")
metrics = hpa.get("spec", {}).get("metrics", [])
if hpa.get("spec", {}).get("scaleTargetRef", {}).get("name") != deployment.get("metadata", {}).get("name") or not any(m.get("external", {}).get("metric", {}).get("name") == "rabbit_guard_scalable_backlog" for m in metrics):
    problems.append("HorizontalPodAutoscaler: on the external metric rabbit_guard_scalable_backlog, for the Deployment")
if "hpa.example.yaml" in kustomization.get("resources", []):
    problems.append("kustomization.yaml: hpa.example.yaml and the ScaledObject would both drive the Deployment")

for p in problems:
    print(f"deploy/kubernetes: {p}", file=sys.stderr)
if not problems:
    print(f"deploy/kubernetes: {len(res)} resources fit together")
sys.exit(1 if problems else 0)
