"""Kueue on the testbed: built from its Go module, run as one process beside the control plane.

fednode's Kubernetes executor can hand its Jobs to Kueue (``executor.kueue``); the tests
prove that against the real Kueue controller-manager, not a stand-in.

* **Build** (:func:`build`, standard library only, from ``scripts/kueue-setup``):
  ``go install sigs.k8s.io/kueue/cmd/kueue@KUEUE_VERSION`` (its go.mod has no replace
  directives) into the testbed's bin directory, with a stamp like the control plane's; the
  module's CRDs and webhook manifests (``config/components``) are copied beside it, so the
  same tag's YAML always goes with the binary. A warm cache builds nothing.
* **Run** (:func:`up`, :func:`down`): the CRDs are applied (server-side, as the admin),
  then ``kueue`` runs as a process with the admin kubeconfig, no leader election, no
  metrics, and its webhook server on ``127.0.0.1`` — serving the testbed's own serving
  certificate (SAN 127.0.0.1, signed by the testbed CA), so Kueue's internal certificate
  management (which writes a Secret for an in-cluster Service and patches the webhook
  configurations) is off and cert-manager is not needed. (kueue v0.14 then reads a metrics
  certificate from the fixed path :data:`METRICS_CERTS`, even with metrics off: the same
  certificate is copied there, so ``up`` needs to write under ``/etc``.) The webhook
  configurations are Kueue's own, pointed at that URL instead of a Service: the Kueue
  kinds' (defaulting and validation of ClusterQueues, Workloads, ...) and batch Jobs', the
  latter limited to
  namespaces labelled :data:`NAMESPACE_LABEL`, so nobody else's Jobs on the shared
  testbed ever pass through Kueue (nor fail when it is stopped). The webhooks of
  integrations that are off (pods, JobSets, Ray, ...) are left out. The on-demand
  visibility API server and MultiKueue are switched off (feature gates): the first would
  need an APIService and a port of its own, the second a manager namespace with
  kubeconfigs; fednode needs neither.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from testbed.console import fail, human, log
from testbed.gobuild import Target, go_binary, go_env
from testbed.layout import BIN_DIR, BUILD_LOG_DIR, GO_CACHE, HOST, KUBECONFIG, PKI, PORTS, RUN_DIR
from testbed.layout import VERSION_DIR as K8S_VERSION_DIR

#: v0.14: client-go v0.34 (one minor from the testbed's 1.33 apiserver, inside the skew
#: Kueue supports), API kueue.x-k8s.io/v1beta1 only (no conversion webhooks yet: v0.15
#: added v1beta2). The module proxy serves v0.14.0 and v0.14.5 of the 0.14 line.
KUEUE_VERSION = "v0.14.5"
#: The module's YAML (CRDs, webhook manifests) that goes with the binary.
KUEUE_HOME = K8S_VERSION_DIR / "kueue" / KUEUE_VERSION
RUN = RUN_DIR / "kueue"
WEBHOOK_PORT = PORTS["kwok"] + 10
HEALTH_PORT = PORTS["kwok"] + 11
#: Only Jobs in namespaces with this label go through Kueue's Job webhooks.
NAMESPACE_LABEL = "fednode.test/kueue"
WEBHOOK_NAME = "fednode-testbed-kueue"
#: Without internal certificate management, kueue v0.14 reads its metrics server's
#: certificate from this fixed path even when metrics are off (cmd/kueue/main.go).
METRICS_CERTS = Path("/etc/kueue/metrics/certs")
FEATURE_GATES = "VisibilityOnDemand=false,MultiKueue=false"
_CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
_WEBHOOK_KINDS = {
    "MutatingWebhookConfiguration": "mutatingwebhookconfigurations",
    "ValidatingWebhookConfiguration": "validatingwebhookconfigurations",
}


def target(jobs: int) -> Target:
    return Target(
        "kueue",
        KUEUE_VERSION,
        (
            "install",
            "-p",
            str(jobs),
            "-trimpath",
            "-ldflags",
            f"-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE_VERSION}",
            f"sigs.k8s.io/kueue/cmd/kueue@{KUEUE_VERSION}",
        ),
        install=True,
    )


def is_built() -> bool:
    return target(1).is_current() and (KUEUE_HOME / "crd").is_dir()


def build(*, jobs: int) -> None:
    """Build (or keep) the kueue binary and copy its module's YAML; idempotent."""
    from testbed.build import build_one  # the control plane's builder, for one more target

    started = time.monotonic()
    if is_built():
        log(f"kueue {KUEUE_VERSION} is current in {BIN_DIR}; nothing to build")
        return
    go, env = go_binary(), go_env()
    for directory in (BIN_DIR, BUILD_LOG_DIR, GO_CACHE / "mod", GO_CACHE / "build"):
        directory.mkdir(parents=True, exist_ok=True)
    log(f"building kueue {KUEUE_VERSION} from Go modules (log in {BUILD_LOG_DIR}/kueue.log)")
    build_one(target(jobs), go=go, env=env)
    source = Path(env["GOMODCACHE"]) / f"sigs.k8s.io/kueue@{KUEUE_VERSION}/config/components"
    shutil.rmtree(KUEUE_HOME, ignore_errors=True)
    KUEUE_HOME.mkdir(parents=True)
    shutil.copytree(source / "crd" / "bases", KUEUE_HOME / "crd")
    shutil.copy(source / "webhook" / "manifests.yaml", KUEUE_HOME / "webhooks.yaml")
    for path in KUEUE_HOME.rglob("*"):  # the module cache is read-only; keep ours writable
        path.chmod(0o755 if path.is_dir() else 0o644)
    size = (BIN_DIR / "kueue").stat().st_size / 2**20
    log(f"kueue {KUEUE_VERSION} built in {human(time.monotonic() - started)} ({size:.0f} MiB)")


# -- running it (needs PyYAML: `up` runs in the project's virtualenv) ----------------------


def component() -> Any:
    from testbed.process import Component

    return Component(
        name="kueue",
        argv=[
            str(BIN_DIR / "kueue"),
            f"--config={RUN / 'config.yaml'}",
            f"--feature-gates={FEATURE_GATES}",
        ],
        health_url=f"http://{HOST}:{HEALTH_PORT}/readyz",
        timeout=180,
        env={"KUBECONFIG": str(KUBECONFIG)},
    )


def config() -> dict[str, Any]:
    """Kueue's Configuration: local ports, our certificate, no leader election or metrics."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta1",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"{HOST}:{HEALTH_PORT}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": HOST, "port": WEBHOOK_PORT, "certDir": str(RUN / "certs")},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "managedJobsNamespaceSelector": {"matchLabels": {NAMESPACE_LABEL: "true"}},
        "integrations": {"frameworks": ["batch/job"]},
    }


def webhook_configurations(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kueue's own webhook configurations, served at our URL, for Kueue's kinds and Jobs."""
    ca_bundle = base64.b64encode((PKI / "ca.crt").read_bytes()).decode()
    result = []
    for manifest in manifests:
        kept = []
        for hook in manifest.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            resources = {r for rule in hook.get("rules") or [] for r in rule.get("resources") or []}
            if groups == {"kueue.x-k8s.io"}:
                pass
            elif groups == {"batch"} and resources == {"jobs"}:
                hook["namespaceSelector"] = {"matchLabels": {NAMESPACE_LABEL: "true"}}
            else:
                continue  # an integration that is off: nothing would answer
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {
                "url": f"https://{HOST}:{WEBHOOK_PORT}{path}",
                "caBundle": ca_bundle,
            }
            kept.append(hook)
        name = f"{WEBHOOK_NAME}-{manifest['kind'][: -len('WebhookConfiguration')].lower()}"
        result.append({**manifest, "metadata": {"name": name}, "webhooks": kept})
    return result


def _request(method: str, path: str, body: dict[str, Any] | None, content_type: str) -> Any:
    from testbed.apiclient import tls_context

    request = urllib.request.Request(
        f"https://{HOST}:{PORTS['kube-apiserver']}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Content-Type": content_type, "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, context=tls_context(), timeout=30) as response:
        return json.loads(response.read() or b"{}")


def _apply(collection: str, obj: dict[str, Any]) -> None:
    """Server-side apply as the admin (create or update; the testbed's field manager)."""
    path = f"{collection}/{obj['metadata']['name']}?fieldManager=fednode-testbed&force=true"
    _request("PATCH", path, obj, "application/apply-patch+yaml")


def _established(name: str) -> bool:
    crd = _request("GET", f"{_CRD_PATH}/{name}", None, "application/json")
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def install_crds() -> list[str]:
    import yaml

    names = []
    for file in sorted((KUEUE_HOME / "crd").glob("*.yaml")):
        crd = yaml.safe_load(file.read_text())
        _apply(_CRD_PATH, crd)
        names.append(crd["metadata"]["name"])
    limit = time.monotonic() + 60
    while not all(_established(n) for n in names):
        if time.monotonic() > limit:
            raise fail(f"Kueue's CRDs are not Established after 60s: {names}")
        time.sleep(0.5)
    return names


def install_webhooks() -> None:
    import yaml

    manifests = list(yaml.safe_load_all((KUEUE_HOME / "webhooks.yaml").read_text()))
    for config in webhook_configurations([m for m in manifests if m]):
        _apply(f"/apis/admissionregistration.k8s.io/v1/{_WEBHOOK_KINDS[config['kind']]}", config)


def remove_webhooks() -> None:
    """Take Kueue's webhooks out of the API server's path (before stopping the process)."""
    for plural in _WEBHOOK_KINDS.values():
        for suffix in ("mutating", "validating"):
            path = f"/apis/admissionregistration.k8s.io/v1/{plural}/{WEBHOOK_NAME}-{suffix}"
            try:
                _request("DELETE", path, None, "application/json")
            except urllib.error.HTTPError as error:
                if error.code != 404:
                    raise


def healthy() -> bool:
    from testbed.process import read_pid

    kueue = component()
    return read_pid(kueue) is not None and kueue.healthy()[0]


def up() -> bool:
    """Start Kueue against the running testbed (no-op when it runs and is healthy); whether
    it was started now."""
    import yaml

    from testbed.process import start_healthy, stop

    if not is_built():
        raise fail("kueue is not built: run scripts/kueue-setup")
    if healthy():
        install_webhooks()  # cheap, and repairs a configuration someone removed
        log("kueue is up")
        return False
    started = time.monotonic()
    kueue = component()
    stop(kueue)  # a stale or unhealthy one
    install_crds()
    try:
        _request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kueue-system"}},
            "application/json",
        )
    except urllib.error.HTTPError as error:
        if error.code != 409:
            raise
    for certs in (RUN / "certs", METRICS_CERTS):
        try:
            certs.mkdir(parents=True, exist_ok=True)
            shutil.copy(PKI / "serving.crt", certs / "tls.crt")
            shutil.copy(PKI / "serving.key", certs / "tls.key")
        except OSError as error:
            raise fail(f"cannot write Kueue's certificates to {certs}: {error}") from error
    (RUN / "config.yaml").write_text(yaml.safe_dump(config(), sort_keys=False))
    start_healthy(kueue)
    install_webhooks()
    log(f"kueue {KUEUE_VERSION} is up in {human(time.monotonic() - started)}")
    return True


def down() -> None:
    """Remove Kueue's webhooks, then stop it; its CRDs (and objects) stay."""
    from testbed.process import stop

    remove_webhooks()
    stop(component())
    log("kueue is stopped")
