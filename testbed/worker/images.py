"""Images on the real worker: OCI archives written here (pause, coredns) and podman's,
imported into containerd. Nothing is ever pulled.

An image is imported again only when its content changed: the key (a hash of the binary,
or podman's image id) is recorded beside containerd's store, which survives ``down``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from testbed.console import fail, log
from testbed.layout import BIN_DIR
from testbed.records import read_json, write_json
from testbed.worker.layout import (
    CONTAINERD_ROOT,
    CONTAINERD_SOCK,
    COREDNS_IMAGE,
    DEFAULT_IMAGES,
    PAUSE_IMAGE,
    WORKER_DIR,
)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(files: dict[str, tuple[bytes, int]]) -> bytes:
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        dirs = sorted({str(Path(p).parent) for p in files} - {"."})
        for directory in dirs:
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            layer.addfile(info)
        for path, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(content), mode
            layer.addfile(info, io.BytesIO(content))
    return layer_buf.getvalue()


def oci_archive(
    ref: str, files: dict[str, tuple[bytes, int]], *, entrypoint: list[str], user: str = ""
) -> bytes:
    """A one-layer OCI image archive (``ctr images import`` format) holding ``files``.

    ``files`` maps a path in the image to (content, mode). Directories are implied.
    """
    layer_bytes = _layer(files)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "User": user, "Env": ["PATH=/"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer_bytes)]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _digest(layer_bytes),
                    "size": len(layer_bytes),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for blob in (layer_bytes, config, manifest):
            add("blobs/sha256/" + _digest(blob).split(":", 1)[1], blob)
    return out.getvalue()


def ctr(
    *args: str, check: bool = True, timeout: float = 300, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``ctr`` against the worker's containerd, in the CRI namespace ``k8s.io``."""
    result = subprocess.run(
        ["/usr/bin/ctr", "--address", str(CONTAINERD_SOCK), "-n", "k8s.io", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise fail(
            f"ctr {' '.join(args[:3])} failed: "
            f"{result.stderr.decode(errors='replace').strip()[-800:]}"
        )
    return result


def import_images(extra: tuple[str, ...] = ()) -> list[str]:
    """Bring the pause, coredns and podman images (and ``extra`` ones) into containerd.

    Returns the references imported; an image is imported again only when podman's image
    id changed since (the ids are recorded beside containerd's store).
    """
    stamps_file = CONTAINERD_ROOT / "fednode-imported.json"
    stamps = read_json(stamps_file)
    done: list[str] = []

    def local(ref: str, key: str, build: Callable[[], bytes]) -> None:
        if stamps.get(ref) == key:
            return
        ctr("images", "import", "--no-unpack=false", "-", stdin=build())
        stamps[ref] = key
        done.append(ref)

    catatonit = Path("/usr/bin/catatonit").read_bytes()
    local(
        PAUSE_IMAGE,
        hashlib.sha256(catatonit).hexdigest(),
        lambda: oci_archive(
            PAUSE_IMAGE,
            {"pause": (catatonit, 0o755)},
            entrypoint=["/pause", "-P"],
            user="65535:65535",
        ),
    )
    coredns = (BIN_DIR / "coredns").read_bytes()
    local(
        COREDNS_IMAGE,
        hashlib.sha256(coredns).hexdigest(),
        lambda: oci_archive(COREDNS_IMAGE, {"coredns": (coredns, 0o755)}, entrypoint=["/coredns"]),
    )

    wanted = [
        i.strip() for i in os.environ.get("FEDNODE_REAL_WORKER_IMAGES", "").split(",") if i.strip()
    ] or list(DEFAULT_IMAGES)
    wanted += [ref for ref in extra if ref not in wanted]
    todo: list[str] = []
    for ref in wanted:
        found = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Id}}", ref],
            capture_output=True,
            text=True,
            check=False,
        )
        if found.returncode != 0:
            if ref in extra:
                raise fail(f"podman has no image {ref}")
            log(f"  note: podman has no {ref} (scripts/podman-setup builds it); not imported")
            continue
        if stamps.get(ref) != found.stdout.strip():
            todo.append(ref)
            stamps[ref] = found.stdout.strip()
    if todo:
        archive = WORKER_DIR / "podman-images.tar"
        subprocess.run(
            ["podman", "save", "-m", "--format", "docker-archive", "-o", str(archive), *todo],
            check=True,
            capture_output=True,
        )
        try:
            ctr("images", "import", str(archive), timeout=600)
        finally:
            archive.unlink(missing_ok=True)
        done += todo
    write_json(stamps_file, stamps)
    return done
