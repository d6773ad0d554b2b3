"""A real worker node for the Kubernetes testbed: pods really run, NetworkPolicy really holds.

``scripts/k8s-testbed up --real-worker`` (or ``FEDNODE_REAL_WORKER=1``) adds one node,
``fednode-worker-0``, beside the kwok nodes. Everything on it is real and local:

* **containerd** (Debian) with **runc**, ``restrict_oom_score_adj = true`` (root has no
  CAP_SYS_RESOURCE here, so negative oom_score_adj values must be clamped to 0), the
  cgroupfs driver, and a **pause** image built here from Debian's static ``catatonit``;
* the **CNI** ``bridge`` + ``host-local`` plugins (Debian, ``/usr/lib/cni``): one bridge
  ``fednode0``, pods in ``10.245.0.0/24``, the bridge address ``10.245.0.1`` is the node IP;
* **kubelet** and **kube-proxy** (iptables mode: this kernel has no IPVS) built from the
  same pinned ``k8s.io/kubernetes`` module as the control plane;
* **Cilium** (built from its Go module; BPF compiled at run time by Debian's clang),
  chained behind the bridge plugin (``generic-veth``), as the NetworkPolicy enforcer.
  kube-router, the first choice, is not served by the module proxy here;
* **CoreDNS** (built from its Go module with only the plugins a cluster DNS needs) as a
  pod ``k8s-app=kube-dns`` in ``kube-system`` behind the ``kube-dns`` Service
  ``10.96.0.10``, answering ``cluster.local`` only: nothing is forwarded anywhere;
* a TCP relay ``10.245.0.1:16443 -> 127.0.0.1:16443`` so pods reach the API server the way
  they do on any node (the ``kubernetes`` Service points at it); the control plane itself
  still listens on loopback only.

The node carries the label ``fednode.test/real=true`` and the taint
``fednode.test/real-worker=true:NoSchedule``: only pods that ask for it land there, so
kwok-targeted tests are unaffected. kwok manages nodes by annotation only, and this node
has none.

Images come from the local podman store (``podman save`` -> ``ctr images import``), so
nothing is pulled; containerd's image store is kept between ``down`` and ``up`` under
``~/.cache/fednode/k8s/containerd`` and an image is imported again only when podman's
image id changed.

Modules: ``layout`` (names, addresses, paths), ``build`` (kubelet, kube-proxy, Cilium,
CoreDNS binaries), ``config`` (the files the processes read), ``images``, ``processes``,
``host`` (bridge, bpffs, iptables, cgroups, sysctls), ``node`` (bring-up, health, teardown).
"""
