"""A stand-in for the Kubernetes API server, for the ``t2v ops`` tests.

Why not the real one: no kube-apiserver can be had on this machine (Debian packages etcd but not
kube-apiserver; neither PyPI nor Debian ships its binary; building it from source is out of reach
here). So this is a real HTTP server on a loopback port that answers the handful of REST calls
``t2v ops`` makes, with JSON in the API server's own shapes, and the ``kubernetes`` client's real code
path runs against it (kubeconfig loading, bearer token, URL building, content types, response
models, ApiException on errors):

* the objects are the ones ``kubectl apply -k deploy/k8s/overlays/gpu`` would create (rendered from
  the repository's manifests), with the fields the server adds (uid, resourceVersion,
  creationTimestamp, status), one Pod per replica on a node of the stage's pool, and the
  HorizontalPodAutoscaler KEDA creates for each ScaledObject (keda-hpa-<name>);
* errors are ``Status`` objects as the API server writes them (403 Forbidden with its RBAC sentence,
  401, 404 NotFound, 429 TooManyRequests for an eviction a PodDisruptionBudget refuses);
* state changes the way the API server's would: a scale patch changes the replicas, a cordon sets
  spec.unschedulable, an evicted pod is listed as terminating once more and then is gone.

It does not check RBAC, admission, or any call ``t2v ops`` does not make (those answer 404). Every
request is recorded in ``requests`` for the tests to inspect.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

TOKEN = "t2v-test-token"
CREATED = "2026-11-25T10:00:00Z"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A metav1.Status, as the API server answers errors (and evictions)."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure" if code >= 400 else "Success",
            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


def _selected(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKubernetes:
    """The API server of one cluster holding one namespace with the mesh deployed."""

    def __init__(self, objects: list[dict[str, Any]], namespace: str = "t2v") -> None:
        self.namespace = namespace
        self.requests: list[Request] = []
        self.forbidden = False                 # answer every call 403, as for a user without the roles
        self.metrics_text = ""                 # what the gateway's /metrics says
        self.metrics_status = 200
        self.evictions_refused: dict[str, int] = {}    # pod -> how many more evictions the PDB refuses
        self.deployments: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.terminating: dict[str, int] = {}   # evicted pod -> lists it still shows up in
        self.nodes: dict[str, dict[str, Any]] = {}
        self.hpas: list[dict[str, Any]] = []
        for i, o in enumerate(objects):
            uid = f"00000000-0000-4000-8000-{i:012d}"
            if o["kind"] == "Deployment":
                d = json.loads(json.dumps(o))
                for container in d["spec"]["template"]["spec"]["containers"]:
                    for amounts in container.get("resources", {}).values():   # the server writes quantities
                        amounts.update((k, str(v)) for k, v in amounts.items())  # as strings: 1 -> "1"
                d["metadata"].update(namespace=namespace, uid=uid, resourceVersion=str(1000 + i), generation=1,
                                     creationTimestamp=CREATED)
                self.deployments[d["metadata"]["name"]] = d
            elif o["kind"] == "ScaledObject":
                self.hpas.append(self._keda_hpa(o))
        for d in self.deployments.values():
            self._sync_pods(d)

    # --- the cluster's state -------------------------------------------------------------------------
    def _keda_hpa(self, scaled: dict[str, Any]) -> dict[str, Any]:
        name = scaled["metadata"]["name"]
        return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": f"keda-hpa-{name}", "namespace": self.namespace, "creationTimestamp": CREATED,
                             "labels": {"scaledobject.keda.sh/name": name}},
                "spec": {"scaleTargetRef": dict(scaled["spec"]["scaleTargetRef"]),
                         "minReplicas": scaled["spec"]["minReplicaCount"],
                         "maxReplicas": scaled["spec"]["maxReplicaCount"],
                         "metrics": [{"type": "External", "external": {
                             "metric": {"name": f"s0-prometheus", "selector": {"matchLabels": {
                                 "scaledobject.keda.sh/name": name}}},
                             "target": {"type": "AverageValue",
                                        "averageValue": scaled["spec"]["triggers"][0]["metadata"]["threshold"]}}}]},
                "status": {"currentReplicas": 1, "desiredReplicas": 1}}

    def _sync_pods(self, deployment: dict[str, Any]) -> None:
        """One Running, ready Pod per replica, on node <pool>-<i> (as the scheduler would have put them)."""
        name = deployment["metadata"]["name"]
        template = deployment["spec"]["template"]
        pool = template["spec"].get("nodeSelector", {}).get("t2v-mesh/pool", "general")
        mine = sorted(p for p, pod in self.pods.items() if pod["metadata"]["labels"].get("app.kubernetes.io/component")
                      == template["metadata"]["labels"]["app.kubernetes.io/component"] and p not in self.terminating)
        wanted = deployment["spec"]["replicas"]
        for i in range(len(mine), wanted):
            pod_name = f"{name}-7d9c8b6f5-{i:05d}"
            node = f"{pool}-node-{i}"
            self.nodes.setdefault(node, {"apiVersion": "v1", "kind": "Node",
                                         "metadata": {"name": node, "labels": {"t2v-mesh/pool": pool},
                                                      "creationTimestamp": CREATED},
                                         "spec": {}, "status": {}})
            spec = json.loads(json.dumps(template["spec"]))
            spec["nodeName"] = node
            self.pods[pod_name] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": self.namespace, "uid": f"pod-{pod_name}",
                             "labels": dict(template["metadata"]["labels"]), "creationTimestamp": CREATED,
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                  "name": f"{name}-7d9c8b6f5", "uid": f"rs-{name}",
                                                  "controller": True}]},
                "spec": spec,
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
        for extra in mine[wanted:]:
            del self.pods[extra]
        deployment["status"] = {"observedGeneration": 1, "replicas": wanted, "updatedReplicas": wanted,
                                "readyReplicas": wanted, "availableReplicas": wanted}

    def set_ready(self, name: str, ready: int) -> None:
        self.deployments[name]["status"]["readyReplicas"] = ready

    # --- HTTP --------------------------------------------------------------------------------------
    def handle(self, request: Request) -> tuple[int, str, bytes]:
        """(status code, content type, body) for one request."""
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return self._json(401, status(401, "Unauthorized", "Unauthorized"))
        if self.forbidden:
            return self._forbidden(request)
        path = urllib.parse.unquote(request.path)
        ns = re.escape(self.namespace)
        routes = [
            ("GET", rf"/apis/apps/v1/namespaces/([^/]+)/deployments", self._list_deployments),
            ("GET", rf"/apis/apps/v1/namespaces/{ns}/deployments/([^/]+)", self._get_deployment),
            ("GET", rf"/apis/apps/v1/namespaces/{ns}/deployments/([^/]+)/scale", self._get_scale),
            ("PATCH", rf"/apis/apps/v1/namespaces/{ns}/deployments/([^/]+)/scale", self._patch_scale),
            ("GET", rf"/apis/autoscaling/v2/namespaces/([^/]+)/horizontalpodautoscalers", self._list_hpas),
            ("GET", rf"/api/v1/namespaces/{ns}/services/gateway:metrics/proxy/metrics", self._metrics),
            ("GET", r"/api/v1/namespaces/([^/]+)", self._get_namespace),
            ("GET", rf"/api/v1/namespaces/([^/]+)/pods", self._list_pods),
            ("POST", rf"/api/v1/namespaces/{ns}/pods/([^/]+)/eviction", self._evict),
            ("PATCH", r"/api/v1/nodes/([^/]+)", self._patch_node),
        ]
        for method, pattern, answer in routes:
            match = re.fullmatch(pattern, path)
            if method == request.method and match:
                return answer(request, *match.groups())
        return self._json(404, status(404, "NotFound", "the server could not find the requested resource"))

    @staticmethod
    def _json(code: int, body: Any) -> tuple[int, str, bytes]:
        return code, "application/json", json.dumps(body).encode()

    def _forbidden(self, request: Request) -> tuple[int, str, bytes]:
        parts = request.path.strip("/").split("/")
        group = "apps" if parts[0] == "apis" and parts[1] == "apps" else ""
        resource = parts[-1] if parts[-1] not in {"scale", "eviction"} else f"{parts[-3]}/{parts[-1]}"
        verb = {"GET": "list", "PATCH": "patch", "POST": "create"}[request.method]
        qualified = f"{resource}.{group}" if group else resource
        message = (f'{qualified} is forbidden: User "alice@example.com" cannot {verb} resource "{resource}" in API '
                   f'group "{group}" in the namespace "{self.namespace}"')
        return self._json(403, status(403, "Forbidden", message, {"kind": resource}))

    def _list_deployments(self, request: Request, namespace: str) -> tuple[int, str, bytes]:
        selector = request.query.get("labelSelector", [""])[0]
        items = [d for d in self.deployments.values() if namespace == self.namespace
                 and _selected(d["metadata"].get("labels", {}), selector)]
        return self._json(200, {"kind": "DeploymentList", "apiVersion": "apps/v1",
                                "metadata": {"resourceVersion": "2000"}, "items": items})

    def _get_deployment(self, request: Request, name: str) -> tuple[int, str, bytes]:
        if name not in self.deployments:
            return self._json(404, status(404, "NotFound", f'deployments.apps "{name}" not found',
                                          {"name": name, "group": "apps", "kind": "deployments"}))
        return self._json(200, self.deployments[name])

    def _scale(self, name: str) -> dict[str, Any]:
        d = self.deployments[name]
        selector = ",".join(f"{k}={v}" for k, v in sorted(d["spec"]["selector"]["matchLabels"].items()))
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": self.namespace, "uid": d["metadata"]["uid"],
                             "resourceVersion": d["metadata"]["resourceVersion"], "creationTimestamp": CREATED},
                "spec": {"replicas": d["spec"]["replicas"]},
                "status": {"replicas": d["status"]["replicas"], "selector": selector}}

    def _get_scale(self, request: Request, name: str) -> tuple[int, str, bytes]:
        if name not in self.deployments:
            return self._get_deployment(request, name)
        return self._json(200, self._scale(name))

    def _patch_scale(self, request: Request, name: str) -> tuple[int, str, bytes]:
        if name not in self.deployments:
            return self._get_deployment(request, name)
        self.deployments[name]["spec"]["replicas"] = int(request.body["spec"]["replicas"])
        self._sync_pods(self.deployments[name])
        return self._json(200, self._scale(name))

    def _list_hpas(self, request: Request, namespace: str) -> tuple[int, str, bytes]:
        items = self.hpas if namespace == self.namespace else []
        return self._json(200, {"kind": "HorizontalPodAutoscalerList", "apiVersion": "autoscaling/v2",
                                "metadata": {"resourceVersion": "2000"}, "items": items})

    def _metrics(self, request: Request) -> tuple[int, str, bytes]:
        if self.metrics_status != 200:
            return self._json(self.metrics_status, status(
                self.metrics_status, "ServiceUnavailable",
                'error trying to reach service: dial tcp 10.0.3.7:9464: connect: connection refused'))
        return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics_text.encode()

    def _get_namespace(self, request: Request, namespace: str) -> tuple[int, str, bytes]:
        if namespace != self.namespace:
            return self._json(404, status(404, "NotFound", f'namespaces "{namespace}" not found',
                                          {"name": namespace, "kind": "namespaces"}))
        return self._json(200, {"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": namespace, "creationTimestamp": CREATED},
                                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})

    def _list_pods(self, request: Request, namespace: str) -> tuple[int, str, bytes]:
        selector = request.query.get("labelSelector", [""])[0]
        items = []
        for name, pod in list(self.pods.items()):
            if namespace != self.namespace or not _selected(pod["metadata"]["labels"], selector):
                continue
            if name in self.terminating:           # an evicted pod shows while it stops, then it is gone
                if self.terminating[name] == 0:
                    del self.pods[name], self.terminating[name]
                    continue
                self.terminating[name] -= 1
                pod = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": CREATED,
                                           "deletionGracePeriodSeconds": 90}}
            items.append(pod)
        return self._json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "2000"},
                                "items": items})

    def _evict(self, request: Request, name: str) -> tuple[int, str, bytes]:
        if name not in self.pods or name in self.terminating:
            return self._json(404, status(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}))
        if self.evictions_refused.get(name, 0) > 0:
            self.evictions_refused[name] -= 1
            component = self.pods[name]["metadata"]["labels"]["app.kubernetes.io/component"]
            return self._json(429, status(
                429, "TooManyRequests", "Cannot evict pod as it would violate the pod's disruption budget.",
                {"causes": [{"reason": "DisruptionBudget",
                             "message": f"The disruption budget {component} needs 1 healthy pods and has 1 currently"}]}))
        self.terminating[name] = 1
        return self._json(201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                "code": 201})

    def _patch_node(self, request: Request, name: str) -> tuple[int, str, bytes]:
        if name not in self.nodes:
            return self._json(404, status(404, "NotFound", f'nodes "{name}" not found', {"name": name, "kind": "nodes"}))
        self.nodes[name]["spec"].update(request.body.get("spec", {}))
        return self._json(200, self.nodes[name])

    # --- serving -----------------------------------------------------------------------------------
    def start(self) -> "FakeKubernetes":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                request = Request(self.command, url.path, urllib.parse.parse_qs(url.query),
                                  {k.lower(): v for k, v in self.headers.items()}, body)
                code, content_type, payload = fake.handle(request)
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def write_kubeconfig(self, path: Path, token: str = TOKEN, server: str | None = None) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": server or self.url}}],
            "users": [{"name": "alice", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "alice",
                                                      "namespace": self.namespace}}]}))
        return path
