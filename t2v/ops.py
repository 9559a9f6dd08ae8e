"""t2v ops: look after the mesh on Kubernetes (deployed from deploy/k8s).

    t2v ops status                 per stage: desired / ready replicas, autoscaler, node pool; the
                                   gateway's queue depth and jobs in flight
    t2v ops scale STAGE N          set a stage's replica count
    t2v ops drain STAGE            move a stage's pods off their nodes gracefully (before a node
                                   pool change): cordon the nodes, evict the pods one by one
                                   through the Eviction API, which honours the PodDisruptionBudgets

It talks to the API server with the kubernetes client (pip install 't2v-mesh[ops]') as your
kubeconfig allows (--kubeconfig, --context, else $KUBECONFIG or ~/.kube/config, else the pod's
service account). The rights it needs are the Role and ClusterRole in deploy/k8s/rbac. Every
failure is one sentence and exit code 1: an unreachable cluster, a missing namespace, a right
you lack (403).

Why drain works this way (docs/deploy.md, "Changing a node pool"): cordoning first keeps the
replacements off the nodes being emptied; the Eviction API (not a plain delete) refuses while the
stage's PodDisruptionBudget (maxUnavailable 1) would be broken, so the next pod goes only once its
replacement is ready, and each evicted pod gets SIGTERM and its terminationGracePeriodSeconds to
finish the work in flight (the services drain on SIGTERM). The nodes stay cordoned afterwards, for
the pool change; `kubectl uncordon NODE` undoes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

DEFAULT_NAMESPACE = "t2v"
PART_OF = "app.kubernetes.io/part-of=t2v-mesh"
COMPONENT = "app.kubernetes.io/component"
POOL_LABEL = "t2v-mesh/pool"
GATEWAY_METRICS_PROXY = "gateway:metrics"          # service gateway, port named "metrics"
# The Deployment of each stage (deploy/k8s), in the order of the flow; a user may type either name.
DEPLOYMENTS = {"text_encoder": "text-encoder", "denoiser": "denoiser", "decoder": "decoder", "gateway": "gateway"}
REQUEST_TIMEOUT = (5.0, 30.0)                       # connect, read: seconds


class OpsError(Exception):
    """A failure the user can act on, said in one sentence; the command exits with 1."""


# --- the command line -----------------------------------------------------------------------------

def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``ops`` and its actions to the ``t2v`` parser (imports nothing from kubernetes)."""
    ops = sub.add_parser("ops", help="look after the mesh on Kubernetes: status, scale, drain",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ops.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    ops.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    ops.add_argument("-n", "--namespace", default=os.environ.get("T2V_NAMESPACE", DEFAULT_NAMESPACE),
                     help="namespace of the mesh [env T2V_NAMESPACE; default t2v]")
    actions = ops.add_subparsers(dest="ops_command", required=True, metavar="ACTION")

    status = actions.add_parser("status", help="replicas, pools and the gateway's queue",
                                description="Per stage: desired and ready replicas, the autoscaler's range, the node "
                                            "pool (the pods' node selector); then the gateway's queue depth by "
                                            "priority and its jobs in flight, read from its /metrics.")
    status.add_argument("--gateway-metrics", metavar="URL", default=None,
                        help="read the gateway's metrics here (e.g. http://127.0.0.1:9464/metrics after "
                             "`kubectl port-forward svc/gateway 9464`) instead of through the API server's "
                             "service proxy")

    scale = actions.add_parser("scale", help="set a stage's replica count",
                               description="Set the replica count of one stage's Deployment. Under an autoscaler "
                                           "(KEDA or an HPA) the count moves back; the command says how to pin it.")
    scale.add_argument("stage", choices=sorted(DEPLOYMENTS) + ["text-encoder"], metavar="STAGE",
                       help="text_encoder, denoiser, decoder or gateway")
    scale.add_argument("replicas", type=int, metavar="N", help="replicas wanted (gateways share one PostgreSQL job store: any number)")

    drain = actions.add_parser("drain", help="move a stage's pods off their nodes, gracefully",
                               description="Cordon the nodes that run the stage's pods, then evict the pods one "
                                           "by one through the Eviction API, which waits for the PodDisruptionBudget "
                                           "(the next pod goes once its replacement is ready); each pod finishes its "
                                           "work in flight before it stops. The nodes stay cordoned (kubectl "
                                           "uncordon NODE undoes it).")
    drain.add_argument("stage", choices=sorted(DEPLOYMENTS) + ["text-encoder"], metavar="STAGE",
                       help="text_encoder, denoiser, decoder or gateway")
    drain.add_argument("--dry-run", action="store_true", help="say what would be cordoned and evicted, change nothing")
    drain.add_argument("--no-cordon", action="store_true",
                       help="evict without cordoning (the replacements may land on the same nodes)")
    drain.add_argument("--timeout", type=float, default=900.0,
                       help="give up after this many seconds (default 900)")
    drain.add_argument("--retry-seconds", type=float, default=5.0,
                       help="wait between eviction tries while the PodDisruptionBudget says no (default 5)")
    ops.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    actions: dict[str, Callable[[Cluster, argparse.Namespace], int]] = {
        "status": cmd_status, "scale": cmd_scale, "drain": cmd_drain}
    try:
        cluster = Cluster.connect(args.kubeconfig, args.context, args.namespace)
        return actions[args.ops_command](cluster, args)
    except OpsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def deployment_name(stage: str) -> str:
    return DEPLOYMENTS.get(stage.replace("-", "_"), stage)


# --- the cluster ----------------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _reason(error: BaseException) -> str:
    """The innermost cause of a connection failure, e.g. 'Connection refused'."""
    seen = error
    while True:
        inner = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
        if inner is None or inner is seen or isinstance(inner, str):
            break
        seen = inner
    text = _first_line(seen)
    return text.split("] ", 1)[-1] if text.startswith("[Errno") else text.split(": ", 1)[-1]


class Cluster:
    """The API clients for one namespace, with every call's failure turned into an OpsError."""

    def __init__(self, api_client: Any, namespace: str, host: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.host = host
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.autoscaling = client.AutoscalingV2Api(api_client)

    @classmethod
    def connect(cls, kubeconfig: str | None, context: str | None, namespace: str) -> "Cluster":
        try:
            from kubernetes import client, config
        except ImportError:
            raise OpsError("the Kubernetes client is not installed: pip install 't2v-mesh[ops]' "
                           "(or pip install kubernetes)") from None
        configuration = client.Configuration()
        in_cluster = ("KUBERNETES_SERVICE_HOST" in os.environ and not kubeconfig and "KUBECONFIG" not in os.environ
                      and not os.path.exists(os.path.expanduser("~/.kube/config")))
        try:
            if in_cluster:
                config.load_incluster_config(client_configuration=configuration)
            else:
                config.load_kube_config(config_file=kubeconfig, context=context,
                                        client_configuration=configuration, persist_config=False)
        except Exception as error:  # noqa: BLE001 - ConfigException, a missing or malformed file: one sentence
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            reason = _first_line(error)
            if context:
                try:
                    names = [c["name"] for c in config.list_kube_config_contexts(config_file=kubeconfig)[0]]
                except Exception:  # noqa: BLE001 - the file itself is the problem: say that
                    names = None
                if names is not None and context not in names:
                    reason = f"it has no context {context}; its contexts: {', '.join(names) or 'none'}"
            raise OpsError(f"cannot use the Kubernetes configuration in {where} ({reason}); "
                           "pass --kubeconfig FILE or --context NAME, or set KUBECONFIG") from None
        configuration.retries = 1       # one retry on a dropped connection, then a clear error
        return cls(client.ApiClient(configuration), namespace, configuration.host)

    def call(self, what: str, method: Callable[..., Any], *args: Any, allow: Sequence[int] = (), **kwargs: Any) -> Any:
        """``method(*args, **kwargs)``; an API error with a status in ``allow`` is returned, not raised."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            return method(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as error:
            if error.status in allow:
                return error
            raise self._refused(what, error) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise OpsError(f"cannot reach the Kubernetes API server at {self.host} ({_reason(error)}): is the "
                           "cluster up, and is your kubeconfig context the right one (kubectl cluster-info)?") from None

    def _refused(self, what: str, error: Any) -> OpsError:
        message = api_message(error)
        if error.status == 401:
            return OpsError(f"the API server at {self.host} did not accept your credentials (401 Unauthorized) "
                            f"when asked to {what}: log in again or refresh your kubeconfig")
        if error.status == 403:
            return OpsError(f"you lack the right to {what} in namespace {self.namespace} (403 Forbidden: {message}); "
                            "ask a cluster admin to bind you the roles in deploy/k8s/rbac")
        if error.status == 0:            # the client could not read the answer (an unexpected content type)
            return OpsError(f"cannot {what}: {error.reason}")
        return OpsError(f"the API server refused to {what} ({error.status} {error.reason}: {message})")

    def no_deployments(self) -> OpsError:
        """Nothing of the mesh in the namespace: say whether the namespace exists at all."""
        from kubernetes.client.exceptions import ApiException

        answer = self.call(f"read namespace {self.namespace}", self.core.read_namespace, self.namespace,
                           allow=(403, 404))
        if isinstance(answer, ApiException) and answer.status == 404:
            return OpsError(f"namespace {self.namespace} does not exist in the cluster at {self.host}; pass "
                            "-n NAMESPACE (or set T2V_NAMESPACE) if the mesh runs elsewhere")
        return OpsError(f"no t2v-mesh Deployments in namespace {self.namespace}: apply an overlay first "
                        "(kubectl apply -k deploy/k8s/overlays/gpu), or pass -n NAMESPACE")

    def deployment(self, stage: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        name = deployment_name(stage)
        answer = self.call(f"read deployment {name}", self.apps.read_namespaced_deployment, name, self.namespace,
                           allow=(404,))
        if isinstance(answer, ApiException):
            raise OpsError(f"there is no Deployment {name} in namespace {self.namespace}: is the mesh deployed "
                           "there (t2v ops status)?")
        return answer

    def autoscalers(self) -> dict[str, Any]:
        """Deployment name -> the HorizontalPodAutoscaler that drives it (KEDA's are keda-hpa-<name>);
        empty when there are none or you may not list them."""
        from kubernetes.client.exceptions import ApiException

        answer = self.call("list horizontalpodautoscalers", self.autoscaling.list_namespaced_horizontal_pod_autoscaler,
                           self.namespace, allow=(403, 404))
        if isinstance(answer, ApiException):
            return {}
        return {hpa.spec.scale_target_ref.name: hpa for hpa in answer.items
                if hpa.spec.scale_target_ref.kind == "Deployment"}


def api_message(error: Any) -> str:
    """The sentence of a Kubernetes Status body, else the HTTP reason."""
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(error.reason or "no details")


# --- status ---------------------------------------------------------------------------------------

@dataclass
class GatewayQueue:
    depth: dict[str, float] = field(default_factory=dict)        # priority -> jobs waiting
    in_flight: float | None = None

    @property
    def waiting(self) -> float:
        return sum(self.depth.values())


def parse_gateway_metrics(text: str) -> GatewayQueue:
    """The queue gauges out of the gateway's Prometheus text (services/gateway/metrics.py)."""
    from prometheus_client.parser import text_string_to_metric_families

    queue = GatewayQueue()
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "t2v_gateway_queue_depth":
                    queue.depth[sample.labels.get("priority", "")] = sample.value
                elif sample.name == "t2v_gateway_jobs_in_flight":
                    queue.in_flight = sample.value
    except ValueError as error:
        raise OpsError(f"the gateway's metrics are not Prometheus text ({_first_line(error)})") from None
    if not queue.depth and queue.in_flight is None:
        raise OpsError("the gateway's metrics have no t2v_gateway_queue_depth or t2v_gateway_jobs_in_flight")
    return queue


def read_gateway_queue(cluster: Cluster, url: str | None) -> tuple[GatewayQueue, str]:
    """The gateway's queue and where it was read; OpsError when it cannot be read."""
    if url:
        try:
            with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT[1]) as response:  # noqa: S310 - the user's URL
                text = response.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise OpsError(f"cannot read the gateway's metrics at {url} ({_reason(error)})") from None
        return parse_gateway_metrics(text), url
    text = cluster.call("read the gateway's metrics through the service proxy",
                        cluster.core.connect_get_namespaced_service_proxy_with_path,
                        GATEWAY_METRICS_PROXY, cluster.namespace, "metrics")
    return parse_gateway_metrics(text), f"service {GATEWAY_METRICS_PROXY} via the API server"


def _pool(deployment: Any) -> str:
    selector = deployment.spec.template.spec.node_selector or {}
    if not selector:
        return "(any node)"
    if POOL_LABEL in selector:
        return selector[POOL_LABEL]
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _stage_of(deployment: Any) -> str:
    labels = deployment.metadata.labels or {}
    return labels.get(COMPONENT, deployment.metadata.name)


def cmd_status(cluster: Cluster, args: argparse.Namespace) -> int:
    listed = cluster.call("list deployments", cluster.apps.list_namespaced_deployment, cluster.namespace,
                          label_selector=PART_OF)
    if not listed.items:
        raise cluster.no_deployments()
    order = list(DEPLOYMENTS.values())
    deployments = sorted(listed.items, key=lambda d: (order.index(_stage_of(d)) if _stage_of(d) in order else 99,
                                                      d.metadata.name))
    autoscalers = cluster.autoscalers()
    rows = [("STAGE", "DESIRED", "READY", "AUTOSCALER", "POOL")]
    for d in deployments:
        hpa = autoscalers.get(d.metadata.name)
        scaler = f"{hpa.spec.min_replicas or 1}..{hpa.spec.max_replicas}" if hpa else "-"
        rows.append((_stage_of(d), str(d.spec.replicas if d.spec.replicas is not None else 1),
                     str(d.status.ready_replicas or 0) if d.status else "0", scaler, _pool(d)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"namespace {cluster.namespace} on {cluster.host}")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    try:
        queue, source = read_gateway_queue(cluster, args.gateway_metrics)
    except OpsError as error:
        print(f"gateway queue: unknown: {error}")
        return 0
    by_priority = ", ".join(f"{p} {queue.depth[p]:g}" for p in ("high", "normal", "low") if p in queue.depth)
    in_flight = "unknown" if queue.in_flight is None else f"{queue.in_flight:g}"
    print(f"gateway queue: {queue.waiting:g} waiting ({by_priority}), {in_flight} in flight (from {source})")
    return 0


# --- scale ----------------------------------------------------------------------------------------

def cmd_scale(cluster: Cluster, args: argparse.Namespace) -> int:
    name = deployment_name(args.stage)
    if args.replicas < 0:
        raise OpsError(f"N is {args.replicas}; a replica count is 0 or more")
    before = cluster.deployment(name).spec.replicas
    cluster.call(f"scale deployment {name}", cluster.apps.patch_namespaced_deployment_scale, name,
                 cluster.namespace, {"spec": {"replicas": args.replicas}})
    print(f"{name}: {before} -> {args.replicas} replicas")
    hpa = cluster.autoscalers().get(name)
    if hpa is not None:
        how = (f"kubectl -n {cluster.namespace} annotate scaledobject {name} "
               f"autoscaling.keda.sh/paused-replicas={args.replicas} --overwrite"
               if hpa.metadata.name.startswith("keda-hpa-") else
               f"change or delete the HorizontalPodAutoscaler {hpa.metadata.name}")
        print(f"note: the autoscaler {hpa.metadata.name} keeps {name} between {hpa.spec.min_replicas or 1} and "
              f"{hpa.spec.max_replicas} replicas and will move it back; to hold {args.replicas}: {how}",
              file=sys.stderr)
    return 0


# --- drain ----------------------------------------------------------------------------------------

def cmd_drain(cluster: Cluster, args: argparse.Namespace) -> int:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = deployment_name(args.stage)
    deployment = cluster.deployment(name)
    selector = ",".join(f"{k}={v}" for k, v in sorted((deployment.spec.selector.match_labels or {}).items()))
    pods = cluster.call(f"list the pods of {name}", cluster.core.list_namespaced_pod, cluster.namespace,
                        label_selector=selector).items
    if not pods:
        print(f"{name}: no pods to drain")
        return 0
    nodes = sorted({p.spec.node_name for p in pods if p.spec.node_name})
    names = [p.metadata.name for p in pods]
    print(f"draining {name}: {len(pods)} pod(s) on node(s) {', '.join(nodes) or '(none yet)'}")
    if len(pods) == 1:
        print(f"note: {name} has one pod, so it serves nothing until its replacement is ready (minutes on a GPU "
              f"node); to avoid that, first run: t2v ops scale {args.stage} 2, and wait until READY shows 2",
              file=sys.stderr)
    if args.dry_run:
        for node in nodes if not args.no_cordon else []:
            print(f"would cordon node {node}")
        for pod in names:
            print(f"would evict pod {pod}")
        return 0
    if not args.no_cordon:
        for node in nodes:
            cluster.call(f"cordon node {node}", cluster.core.patch_node, node, {"spec": {"unschedulable": True}})
            print(f"cordoned node {node}")
    deadline = time.monotonic() + args.timeout
    evicted = []
    for pod in names:
        body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=cluster.namespace))
        told = False
        while True:
            answer = cluster.call(f"evict pod {pod}", cluster.core.create_namespaced_pod_eviction, pod,
                                  cluster.namespace, body, allow=(404, 429))
            if not isinstance(answer, ApiException):
                evicted.append(pod)
                print(f"evicted pod {pod} (it finishes its work in flight, then stops)")
                break
            if answer.status == 404:
                print(f"pod {pod} is already gone")
                break
            if time.monotonic() + args.retry_seconds > deadline:
                raise OpsError(f"gave up after {args.timeout:g} s: the PodDisruptionBudget of {name} still allows "
                               f"no eviction of {pod} ({api_message(answer)}); evicted {len(evicted)} of "
                               f"{len(names)}, and the nodes stay cordoned (kubectl uncordon NODE undoes it)")
            if not told:
                print(f"waiting: the PodDisruptionBudget of {name} allows no eviction of {pod} yet "
                      "(a replacement is still getting ready)")
                told = True
            time.sleep(args.retry_seconds)
    _wait_gone(cluster, name, selector, set(evicted), deadline, args)
    cordoned = f"; the nodes stay cordoned: kubectl uncordon {' '.join(nodes)}" if nodes and not args.no_cordon else ""
    print(f"drained {name}: {len(evicted)} pod(s) evicted and stopped{cordoned}")
    return 0


def _wait_gone(cluster: Cluster, name: str, selector: str, evicted: set[str], deadline: float,
               args: argparse.Namespace) -> None:
    """Until the evicted pods have finished their graceful stop and are gone."""
    while evicted:
        listed = cluster.call(f"list the pods of {name}", cluster.core.list_namespaced_pod, cluster.namespace,
                              label_selector=selector).items
        remaining = evicted & {p.metadata.name for p in listed}
        if not remaining:
            return
        if time.monotonic() + args.retry_seconds > deadline:
            raise OpsError(f"gave up after {args.timeout:g} s: pod(s) {', '.join(sorted(remaining))} are still "
                           "stopping (kubectl get pods shows them)")
        time.sleep(args.retry_seconds)
