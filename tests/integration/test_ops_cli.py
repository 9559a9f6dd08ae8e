"""``t2v ops`` against an API server: status, scale, drain, and the errors a user meets.

NOT a real Kubernetes API server: none can be run here (no kube-apiserver binary is packaged for
this machine). The server is tests/k8s_fake_api.py, a real HTTP server on a loopback port that
answers the calls ``t2v ops`` makes with the API server's JSON shapes, holding the objects of the
rendered gpu overlay (deploy/k8s/overlays/gpu). The real ``kubernetes`` client runs end to end
against it: kubeconfig, bearer token, URLs, content types, response models, error statuses. What
this cannot show: RBAC evaluation, admission, a real PodDisruptionBudget controller, kubelets.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import generate_latest

from services.gateway.metrics import GatewayMetrics
from t2v.cli import main
from tests.k8s_fake_api import FakeKubernetes
from tests.k8s_render import K8S, REPO, render

pytestmark = pytest.mark.slow      # each test starts a (local) HTTP server


def gateway_metrics_text(high: int = 2, normal: int = 10, low: int = 0, running: int = 8) -> str:
    """The gateway's real /metrics output (services/gateway/metrics.py), with a queue."""
    metrics = GatewayMetrics()
    for priority, depth in (("high", high), ("normal", normal), ("low", low)):
        metrics.set_queue_depth(priority, depth)
    metrics.in_flight(running)
    return generate_latest(metrics.registry).decode()


@pytest.fixture()
def cluster() -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes(render(K8S / "overlays" / "gpu"), namespace="t2v").start()
    fake.metrics_text = gateway_metrics_text()
    yield fake
    fake.stop()


@pytest.fixture()
def kubeconfig(cluster: FakeKubernetes, tmp_path: Path) -> str:
    return str(cluster.write_kubeconfig(tmp_path / "kubeconfig"))


def ops(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["ops", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines()[2:] if not line.startswith("gateway queue")}


def test_status_shows_each_stage_and_the_gateways_queue(cluster, kubeconfig, capsys) -> None:
    cluster.deployments["denoiser"]["spec"]["replicas"] = 3
    cluster.set_ready("denoiser", 2)
    code, out, err = ops(capsys, "--kubeconfig", kubeconfig, "-n", "t2v", "status")
    assert code == 0, err
    rows = table(out)
    assert list(rows) == ["text-encoder", "denoiser", "decoder", "gateway"]
    assert rows["denoiser"] == ["denoiser", "3", "2", "1..4", "denoiser"]        # desired, ready, keda, pool
    assert rows["text-encoder"][4] == "text-encoder" and rows["decoder"][4] == "decoder"
    assert rows["gateway"] == ["gateway", "3", "3", "-", "(any", "node)"]
    assert "gateway queue: 12 waiting (high 2, normal 10, low 0), 8 in flight" in out
    assert "via the API server" in out
    proxied = [r for r in cluster.requests if "/proxy/" in r.path]
    assert [r.path for r in proxied] in (["/api/v1/namespaces/t2v/services/gateway:metrics/proxy/metrics"],
                                         ["/api/v1/namespaces/t2v/services/gateway%3Ametrics/proxy/metrics"])
    listed = next(r for r in cluster.requests if r.path == "/apis/apps/v1/namespaces/t2v/deployments")
    assert listed.query["labelSelector"] == ["app.kubernetes.io/part-of=t2v-mesh"]


def test_status_reads_the_metrics_from_a_given_url(cluster, kubeconfig, capsys) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    text = gateway_metrics_text(high=0, normal=1, low=4, running=3).encode()

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        code, out, err = ops(capsys, "--kubeconfig", kubeconfig, "status", "--gateway-metrics", url)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, err
    assert f"gateway queue: 5 waiting (high 0, normal 1, low 4), 3 in flight (from {url})" in out
    assert not [r for r in cluster.requests if "/proxy/" in r.path]


def test_status_still_shows_the_stages_when_the_gateway_cannot_be_read(cluster, kubeconfig, capsys) -> None:
    cluster.metrics_status = 503
    code, out, err = ops(capsys, "--kubeconfig", kubeconfig, "status")
    assert code == 0 and "denoiser" in out
    assert "gateway queue: unknown: the API server refused to read the gateway's metrics through the service proxy " \
           "(503" in out and "connection refused" in out


def test_scale_sets_the_replicas_and_says_the_autoscaler_will_move_them(cluster, kubeconfig, capsys) -> None:
    code, out, err = ops(capsys, "--kubeconfig", kubeconfig, "scale", "denoiser", "3")
    assert code == 0, err
    assert out.strip() == "denoiser: 1 -> 3 replicas"
    assert "keda-hpa-denoiser keeps denoiser between 1 and 4" in err
    assert "kubectl -n t2v annotate scaledobject denoiser autoscaling.keda.sh/paused-replicas=3" in err
    (patch,) = [r for r in cluster.requests if r.method == "PATCH"]
    assert patch.path == "/apis/apps/v1/namespaces/t2v/deployments/denoiser/scale"
    assert patch.body == {"spec": {"replicas": 3}}
    assert patch.headers["content-type"] in {"application/strategic-merge-patch+json", "application/merge-patch+json"}
    assert cluster.deployments["denoiser"]["spec"]["replicas"] == 3
    code, out, _ = ops(capsys, "--kubeconfig", kubeconfig, "scale", "text_encoder", "2")   # either spelling
    assert code == 0 and out.strip() == "text-encoder: 1 -> 2 replicas"


def test_scale_sets_any_number_of_gateways(cluster, kubeconfig, capsys) -> None:
    """Gateways share one PostgreSQL job store, so they scale like the stages (once one SQLite gateway)."""
    code, out, err = ops(capsys, "--kubeconfig", kubeconfig, "scale", "gateway", "5")
    assert code == 0, err
    assert out.startswith("gateway: 3 -> 5 replicas")
    assert [r.method for r in cluster.requests if r.method == "PATCH"] == ["PATCH"]


def test_drain_cordons_the_nodes_then_evicts_pod_by_pod_as_the_pdb_allows(cluster, kubeconfig, capsys) -> None:
    cluster.deployments["denoiser"]["spec"]["replicas"] = 2
    cluster._sync_pods(cluster.deployments["denoiser"])
    pods = sorted(p for p in cluster.pods if p.startswith("denoiser-"))
    cluster.evictions_refused[pods[1]] = 2          # its PDB says no twice: the replacement is starting
    code, out, err = ops(capsys, "--kubeconfig", kubeconfig, "drain", "denoiser", "--retry-seconds", "0.01")
    assert code == 0, err
    changes = [(r.method, r.path) for r in cluster.requests if r.method in {"PATCH", "POST"}]
    assert changes == [("PATCH", "/api/v1/nodes/denoiser-node-0"), ("PATCH", "/api/v1/nodes/denoiser-node-1"),
                       ("POST", f"/api/v1/namespaces/t2v/pods/{pods[0]}/eviction")] + \
        [("POST", f"/api/v1/namespaces/t2v/pods/{pods[1]}/eviction")] * 3, "cordon first, then one pod at a time"
    assert all(cluster.nodes[n]["spec"] == {"unschedulable": True} for n in ("denoiser-node-0", "denoiser-node-1"))
    evictions = [r.body for r in cluster.requests if r.method == "POST"]
    assert evictions[0]["metadata"] == {"name": pods[0], "namespace": "t2v"}
    assert evictions[0].get("apiVersion", "policy/v1") == "policy/v1"
    assert f"waiting: the PodDisruptionBudget of denoiser allows no eviction of {pods[1]} yet" in out
    assert out.strip().endswith("drained denoiser: 2 pod(s) evicted and stopped; the nodes stay cordoned: "
                                "kubectl uncordon denoiser-node-0 denoiser-node-1")
    assert not [p for p in cluster.pods if p.startswith("denoiser-")]          # waited until they were gone


def test_drain_dry_run_changes_nothing(cluster, kubeconfig, capsys) -> None:
    code, out, err = ops(capsys, "--kubeconfig", kubeconfig, "drain", "decoder", "--dry-run")
    assert code == 0, err
    assert "would cordon node decoder-node-0" in out and "would evict pod decoder-7d9c8b6f5-00000" in out
    assert "note: decoder has one pod, so it serves nothing until its replacement is ready" in err
    assert not [r for r in cluster.requests if r.method != "GET"]


def test_drain_gives_up_when_the_pdb_never_allows_it(cluster, kubeconfig, capsys) -> None:
    cluster.evictions_refused["decoder-7d9c8b6f5-00000"] = 10 ** 6
    code, out, err = ops(capsys, "--kubeconfig", kubeconfig, "drain", "decoder", "--timeout", "0.2",
                         "--retry-seconds", "0.02")
    assert code == 1
    note, error = err.splitlines()          # the one-pod note, then the error
    assert note.startswith("note: decoder has one pod")
    assert error.startswith("error: gave up after 0.2 s: the PodDisruptionBudget of decoder still allows no eviction "
                            "of decoder-7d9c8b6f5-00000 (Cannot evict pod as it would violate the pod's disruption "
                            "budget.)")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case, expected", [
    ("forbidden", 'error: you lack the right to list deployments in namespace t2v (403 Forbidden: '
                  'deployments.apps is forbidden: User "alice@example.com" cannot list resource "deployments" in API '
                  'group "apps" in the namespace "t2v"); ask a cluster admin to bind you the roles in deploy/k8s/rbac'),
    ("bad token", "error: the API server at {url} did not accept your credentials (401 Unauthorized) when asked to "
                  "list deployments: log in again or refresh your kubeconfig"),
    ("unreachable", "error: cannot reach the Kubernetes API server at http://127.0.0.1:{port} (Connection refused): "
                    "is the cluster up, and is your kubeconfig context the right one (kubectl cluster-info)?"),
    ("no namespace", "error: namespace nowhere does not exist in the cluster at {url}; pass -n NAMESPACE "
                     "(or set T2V_NAMESPACE) if the mesh runs elsewhere"),
    ("no kubeconfig", "error: cannot use the Kubernetes configuration in {tmp}/missing (Invalid kube-config file. "
                      "No configuration found.); pass --kubeconfig FILE or --context NAME, or set KUBECONFIG"),
    ("no such context", "error: cannot use the Kubernetes configuration in {tmp}/kubeconfig (it has no context "
                        "elsewhere; its contexts: test); pass --kubeconfig FILE or --context NAME, or set KUBECONFIG"),
])
def test_errors_are_one_sentence_and_exit_code_1(case, expected, cluster, kubeconfig, tmp_path, capsys) -> None:
    port = _closed_port()
    argv = ["--kubeconfig", kubeconfig]
    if case == "forbidden":
        cluster.forbidden = True
    elif case == "bad token":
        argv = ["--kubeconfig", str(cluster.write_kubeconfig(tmp_path / "stale", token="expired"))]
    elif case == "unreachable":
        argv = ["--kubeconfig", str(cluster.write_kubeconfig(tmp_path / "gone", server=f"http://127.0.0.1:{port}"))]
    elif case == "no namespace":
        argv += ["-n", "nowhere"]
    elif case == "no kubeconfig":
        argv = ["--kubeconfig", str(tmp_path / "missing")]
    elif case == "no such context":
        argv += ["--context", "elsewhere"]
    code, out, err = ops(capsys, *argv, "status")
    assert code == 1 and out == ""
    assert err == expected.format(url=cluster.url, port=port, tmp=tmp_path) + "\n"


def test_the_installed_command_prints_no_traceback(cluster, kubeconfig) -> None:
    cluster.forbidden = True
    done = subprocess.run([sys.executable, "-m", "t2v.cli", "ops", "--kubeconfig", kubeconfig, "scale", "denoiser",
                           "2"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1
    assert done.stderr.startswith("error: you lack the right to read deployment denoiser in namespace t2v "
                                  "(403 Forbidden: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
