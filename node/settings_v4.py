"""Carries a vantage6 4 ``node.yaml`` over to fednode's keys, saying what changed.

An organization moving from a vantage6 4.x node should change nothing but the command. So
the file it already has is read as it is: before :mod:`node.settings` validates a file,
:func:`carry_over` turns the keys only vantage6 4 knows into fednode's, or drops them. Each
key is handled in one of three ways, listed in ``docs/configuration.md``:

* **honoured**: fednode does what the 4.x node did (``databases[].env``, ``algorithm_env``,
  ``share_algorithm_logs``, ``share_config``, ``docker_registries``, ``require_algorithm_pull``
  as the executor's pull policy, ...), under the same key or translated to its own;
* **dropped, with a note**: fednode does something else instead (no VPN, no SSH tunnels, no
  log files of its own...); each note is one warning line naming the keys and what fednode
  does instead. A key whose value asks for nothing (empty, ``false``) is dropped silently:
  fednode already does what it says;
* **refused**: a real contradiction, where carrying the key over would silently widen who
  may run what (algorithm stores fednode cannot ask with no image list to fall back on,
  organizations named rather than numbered) or two keys disagree. These are problems,
  one line each naming the key and the fix; the configuration is not valid.

A file with only fednode's keys passes through unchanged, without notes. Nothing here
reads files or the environment: the input is the file's parsed YAML.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class CarriedOver:
    """One warning line: the vantage6 4 keys it is about and what fednode does instead."""

    keys: tuple[str, ...]
    message: str

    @property
    def line(self) -> str:
        return f"{', '.join(self.keys)}: {self.message}"


@dataclass(slots=True)
class CarryOver:
    """The file's values in fednode's keys, the notes, and what cannot be carried over."""

    values: dict[str, Any]
    notes: list[CarriedOver] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def note(self, keys: list[str], message: str) -> None:
        if keys:
            self.notes.append(CarriedOver(tuple(keys), message))


#: Top-level keys of the 4.x node that fednode has no use for, grouped by what it does
#: instead (one warning line per group, naming the keys the file has).
DROPPED: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("node_extra_env", "node_extra_mounts", "node_extra_hosts"),
        "no CLI starts fednode in a container: give the node process its environment, "
        "mounts and host names where you start it (systemd unit, container, Helm values)",
    ),
    (
        ("images", "alpine"),
        "fednode starts no helper containers (VPN client, SSH tunnel, squid, alpine); the "
        "node's own image is chosen where it is installed",
    ),
    (
        ("directories",),
        "fednode keeps run files in task_dir and writes its log to standard output",
    ),
    (
        ("vpn_subnet",),
        "fednode has no VPN: the runs of one task reach each other only through the node proxies",
    ),
    (
        ("ssh-tunnels", "ssh_tunnels"),
        "fednode opens no SSH tunnels: make the data source reachable from this host and "
        "declare it as a network database (type sql, sparql or omop)",
    ),
    (
        ("whitelist", "docker_services"),
        "runs reach only the node proxy and the network databases they asked for; fednode "
        "lets nothing else through",
    ),
    (("debug",), "fednode has no debug switches: set logging.level: DEBUG"),
    (
        ("prometheus",),
        "fednode reports no host metrics to the server",
    ),
    (
        ("run_context_file",),
        "fednode writes no run context file (runs get no RUN_CONTEXT_FILE)",
    ),
)

#: Keys of the 4.x ``logging`` block that fednode's logging does not have.
V4_LOGGING_KEYS = ("use_console", "backup_count", "max_size", "file", "datefmt", "loggers")

#: Pull policies of the built-in executors: (key, when require_algorithm_pull is true, false).
PULL_POLICY = {
    "podman": ("pull_policy", "always", "if-not-present"),
    "apptainer": ("pull_policy", "always", "if-not-present"),
    "kubernetes": ("image_pull_policy", "Always", "IfNotPresent"),
}

#: What vantage6 4 takes for a regular expression in ``allowed_algorithms`` (anything
#: else is an image name, compared exactly or, without a tag, with any tag).
_V4_REGEX_MARKS = ("*", "\\", "?", "$", "^", "[", "]", "(", ")", "{", "}", "|", "+")
_ANY_TAG_OR_DIGEST = r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"


def carry_over(values: Mapping[str, Any]) -> CarryOver:
    """``values`` (a parsed ``node.yaml``) in fednode's keys; see the module docstring."""
    carried = CarryOver(copy.deepcopy(dict(values)))
    v4_file = False
    for step in _STEPS:
        v4_file = step(carried) or v4_file
    if v4_file:
        _v4_image_patterns(carried)
    return carried


def _dropped_keys(carried: CarryOver) -> bool:
    found = False
    for keys, message in DROPPED:
        named = []
        for key in keys:
            if key not in carried.values:
                continue
            found = True
            if _asks_for_something(carried.values.pop(key)):
                named.append(key)
        carried.note(named, message)
    return found


def _empty_maps(carried: CarryOver) -> bool:
    """``algorithm_env:`` left empty, ``databases:`` empty, ``port:`` unset, as 4.x allows."""
    values = carried.values
    found = False
    for key in ("algorithm_env", "databases"):
        if key in values and values[key] is None:
            del values[key]
            found = True
    if "port" in values and values["port"] is None:
        url = str(values.get("server_url", ""))
        values["port"] = 80 if url.startswith("http://") else 443
        found = True
    return found


def _device_requests(carried: CarryOver) -> bool:
    """``gpu: true`` (4.x: every algorithm container gets all GPUs): a run no resource
    profile covers gets ``policies.resources.max_gpus`` GPUs, its own, as
    ``default_gpus``; ``gpu: false`` is fednode's default (``default_gpus: 0``)."""
    requests = carried.values.pop("algorithm_device_requests", None)
    if requests is None:
        return False
    if not (isinstance(requests, Mapping) and requests.get("gpu")):
        return True
    max_gpus = _get(carried.values, "policies", "resources", "max_gpus")
    if not isinstance(max_gpus, int) or max_gpus < 1:
        carried.problems.append(
            "algorithm_device_requests.gpu: true, but policies.resources.max_gpus is "
            f"{max_gpus if max_gpus is not None else 0}: set max_gpus to the GPUs a run may "
            "have (runs no resource profile covers get that many)"
        )
        return True
    resources = carried.values["policies"]["resources"]
    if not resources.get("default_gpus"):
        resources["default_gpus"] = max_gpus
    carried.note(
        ["algorithm_device_requests.gpu"],
        f"a run no resource profile covers gets policies.resources.max_gpus ({max_gpus}) "
        "GPUs of its own (policies.resources.default_gpus), not all of the host's",
    )
    return True


def _logging(carried: CarryOver) -> bool:
    block = carried.values.get("logging")
    if not isinstance(block, dict):
        return False
    found = [key for key in V4_LOGGING_KEYS if key in block]
    for key in found:
        del block[key]
    fmt = block.get("format")
    if isinstance(fmt, str) and "%(" in fmt:  # a line format for Python's logging.Formatter
        del block["format"]
        found.append("format")
    carried.note(
        [f"logging.{key}" for key in found],
        "fednode writes structured events to its standard output (logging.format: auto, "
        "json or console); log files, rotation, line formats and per-library levels are "
        "the supervisor's (journald, kubectl logs)",
    )
    level = block.get("level")
    if isinstance(level, str) and level.upper() == "CRITICAL":
        block["level"] = "ERROR"
        carried.note(["logging.level"], "CRITICAL is taken as ERROR, fednode's quietest level")
        found.append("level")
    return bool(found)


def _databases(carried: CarryOver) -> bool:
    databases = carried.values.get("databases")
    if not isinstance(databases, list):
        return False
    copied = []
    found = False
    for index, db in enumerate(databases):
        if not isinstance(db, dict):
            continue
        if "env" in db and db["env"] is None:
            db["env"] = {}
        if "mount_mode" not in db:
            continue
        found = True
        mode = db.pop("mount_mode")
        if str(mode).lower() == "copy":
            copied.append(f"databases[{index}].mount_mode")
        elif str(mode).lower() != "ro":
            carried.problems.append(
                f"databases[{index}].mount_mode: expected copy or ro (got {mode!r})"
            )
    carried.note(
        copied,
        "fednode never copies data: file databases are mounted read-only where they are",
    )
    return found


def _policies(carried: CarryOver) -> bool:
    policies = carried.values.get("policies")
    if not isinstance(policies, dict):
        return False
    found = False
    for key in ("allowed_algorithms", "allowed_algorithm_stores"):
        if isinstance(policies.get(key), str):  # the 4.x node takes one entry as a list
            policies[key] = [policies[key]]
            found = True
    found = _stores(carried, policies) or found
    if "allow_basics_algorithm" in policies:
        found = True
        if not policies.pop("allow_basics_algorithm"):
            carried.note(
                ["policies.allow_basics_algorithm"],
                "fednode has no deny list: an image runs if policies.allowed_algorithms "
                "allows it, so leave the basics algorithm out of that list",
            )
    if "require_algorithm_pull" in policies:
        found = True
        _pull_policy(carried, bool(policies.pop("require_algorithm_pull")))
    for key in ("allowed_organizations", "allowed_users"):
        found = _ids(carried, policies, key) or found
    return found


def _stores(carried: CarryOver, policies: dict[str, Any]) -> bool:
    found = False
    either = False
    if "allow_either_whitelist_or_store" in policies:
        found = True
        either = bool(policies.pop("allow_either_whitelist_or_store"))
    if "allowed_algorithm_stores" not in policies:
        return found
    stores = policies.pop("allowed_algorithm_stores")
    if not stores:
        return True
    if not policies.get("allowed_algorithms"):
        carried.problems.append(
            "policies.allowed_algorithm_stores: fednode does not ask algorithm stores, and "
            "with policies.allowed_algorithms empty it would run any image: list the "
            "images this node may run in policies.allowed_algorithms (regular expressions "
            "matching whole names) and remove allowed_algorithm_stores"
        )
        return True
    carried.note(
        ["policies.allowed_algorithm_stores"]
        + (["policies.allow_either_whitelist_or_store"] if either else []),
        "fednode does not ask algorithm stores: policies.allowed_algorithms alone decides "
        "which images run"
        + (" (images a store approves but that list does not are refused)" if either else ""),
    )
    return True


def _pull_policy(carried: CarryOver, always: bool) -> None:
    executor = carried.values.setdefault("executor", {"kind": "podman"})
    if not isinstance(executor, dict):
        return  # validation says what is wrong with it
    kind = executor.get("kind", "podman")
    if kind not in PULL_POLICY:
        carried.note(
            ["policies.require_algorithm_pull"],
            f"set the pull policy in the settings of executor {kind!r} instead",
        )
        return
    key, when_true, when_false = PULL_POLICY[kind]
    wanted = when_true if always else when_false
    given = executor.get(key)
    if given is not None and given != wanted:
        carried.problems.append(
            f"policies.require_algorithm_pull is {str(always).lower()}, but "
            f"executor.{key} is {given!r}: remove one of them (true means "
            f"executor.{key}: {when_true})"
        )
        return
    executor[key] = wanted


def _ids(carried: CarryOver, policies: dict[str, Any], key: str) -> bool:
    """Ids written as text are numbers; names cannot be checked by fednode (refused, and
    left out so that validation does not report them a second time)."""
    entries = policies.get(key)
    if not isinstance(entries, list):
        return False
    found = False
    kept: list[Any] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str) and entry.strip().isdigit():
            kept.append(int(entry))
            found = True
        elif isinstance(entry, str):
            what = "organization" if key == "allowed_organizations" else "user"
            carried.problems.append(
                f"policies.{key}[{index}]: {entry!r} is a name, and fednode checks {what} "
                f"ids only: give the {what}'s id (the server lists it) instead"
            )
            found = True
        else:
            kept.append(entry)
    policies[key] = kept
    return found


def _v4_image_patterns(carried: CarryOver) -> None:
    """``allowed_algorithms`` with the meaning vantage6 4 gave them, as fednode writes it.

    fednode matches a pattern against the WHOLE image name; the 4.x node took an entry
    with regular-expression characters as a pattern for the START of the name, and any
    other entry as an image name (without a tag: any tag of it). In a file that is a
    vantage6 4 file (it had keys only 4.x knows) each entry is rewritten to mean what it
    meant there, and the rewrite is said in one note.
    """
    policies = carried.values.get("policies")
    patterns = policies.get("allowed_algorithms") if isinstance(policies, dict) else None
    if not isinstance(patterns, list):
        return
    rewritten = []
    for index, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            continue
        whole = _whole_name_pattern(pattern)
        if whole != pattern:
            patterns[index] = whole
            rewritten.append(f"{pattern!r} as {whole!r}")
    if rewritten:
        carried.note(
            ["policies.allowed_algorithms"],
            "fednode matches whole image names; written with vantage6 4's meaning: "
            + "; ".join(rewritten),
        )


def _whole_name_pattern(entry: str) -> str:
    if any(mark in entry for mark in _V4_REGEX_MARKS):
        return f"(?:{entry}).*"  # re.match(entry, name) is re.fullmatch(this, name)
    if _has_tag_or_digest(entry):
        return re.escape(entry)
    return re.escape(entry) + _ANY_TAG_OR_DIGEST


def _has_tag_or_digest(name: str) -> bool:
    return "@" in name or ":" in name.rsplit("/", 1)[-1]


def _asks_for_something(value: Any) -> bool:
    """Whether a dropped key's value asks for anything (``enabled: false`` asks nothing)."""
    if isinstance(value, Mapping):
        if "enabled" in value and not value["enabled"]:
            return False
        return any(_asks_for_something(item) for item in value.values())
    return value not in (None, False, "", [], {})


def _get(values: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(values, Mapping):
            return None
        values = values.get(key)  # type: ignore[assignment]
    return values


#: The steps of :func:`carry_over`; each says whether it met a key only vantage6 4 has.
_STEPS: tuple[Callable[[CarryOver], bool], ...] = (
    _dropped_keys,
    _empty_maps,
    _device_requests,
    _logging,
    _databases,
    _policies,
)
