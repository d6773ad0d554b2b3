"""The real Kubernetes testbed: a pinned control plane built from Go modules, plus kwok nodes.

fednode's Kubernetes executor is tested against a real kube-apiserver (admission, RBAC,
Pod Security, watch semantics), a real kube-controller-manager (Job controller, garbage
collector, service-account tokens) and a real kube-scheduler (resources, GPUs, taints).
No container runtime runs the pods on the kwok nodes: kwok plays the kubelet, moving pods
through the phases the tests ask for with annotations (``testbed.kwok``, docs/testing.md).

Nothing here downloads release binaries: everything is compiled from the Go module proxy.

* ``build`` (``testbed.build``) makes a throwaway wrapper module that requires
  ``k8s.io/kubernetes`` at the pinned tag and replaces every staging module (read from that
  tag's own go.mod) with its published ``v0.MINOR.PATCH`` twin; it builds kube-apiserver,
  kube-controller-manager, kube-scheduler and etcd (the version k8s itself requires) from
  it, one at a time, and kwok with ``go install``. Binaries land in
  ``~/.cache/fednode/k8s/<version>/bin``, with one stamp file each; a warm cache rebuilds
  nothing.
* ``up`` (``testbed.cluster``) writes certificates (``testbed.pki``), starts the five
  processes of ``testbed.controlplane`` on 127.0.0.1 with fixed ports, waits until each one
  is healthy and the kwok nodes are Ready, and records pids under
  ``~/.cache/fednode/k8s/run``. It is idempotent.
* ``down`` stops the recorded processes and wipes the run state; ``status`` checks health;
  ``env`` prints the ``export KUBECONFIG=...`` line.
* ``--real-worker`` (``build`` and ``up``; or ``FEDNODE_REAL_WORKER=1``) adds one real node
  beside the kwok nodes, where pods really run and NetworkPolicy is enforced: see
  ``testbed.worker``. ``import-images`` copies podman images to it.

The package is the project's test peer, not part of the ``fednode`` distribution: run it
through ``scripts/k8s-testbed`` (which picks the project's virtualenv); ``tests/peers``
imports its constants (paths, ports, node names, pod annotations) so the two never drift.
``build`` needs only the standard library (it runs before any virtualenv exists); the
modules that need ``cryptography`` or PyYAML are imported by the commands that use them.
"""
