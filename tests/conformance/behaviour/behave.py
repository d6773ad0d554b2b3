"""A test algorithm that does what its input says (the executor conformance suite's probe).

Input: one JSON object, all keys optional: ``exit_code`` (default 0), ``sleep`` (seconds),
``allocate_mb`` (touch this much memory, then hold it), ``output`` (text written to the
output file), ``log`` (a line for stdout; one also goes to stderr), ``env`` (names of
environment variables: the output is then a JSON object of their decoded values, null
for those not set). Two keys play an
attacker: ``output_link`` replaces the output file with a symbolic link to that path (as
``ln -sf``; exit code 17 with the error when the runtime does not let it), and
``output_size`` makes the output that many bytes long without writing them (a sparse
file). ``describe`` (``{"env": [names], "paths": [paths]}``) makes the output a JSON
report of those variables and of what each path is (``char`` device with its numbers,
``file`` with its first bytes, or ``missing``): what a runtime injected (GPU devices). It
follows the
vantage6 4.x file contract (``INPUT_FILE``, ``OUTPUT_FILE``; values may be base32-encoded
with ``=`` as ``!``), so every executor runs it like any algorithm.
"""

import base64
import binascii
import json
import os
import stat
import sys
import time
from pathlib import Path

#: The exit code when the runtime does not let the run put a link in place of its output.
LINK_REFUSED = 17


def env(name):
    value = os.environ[name]
    try:
        return base64.b32decode(value.replace("!", "=")).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return value


def describe(asked):
    report = {"env": {name: os.environ.get(name) for name in asked.get("env", [])}, "paths": {}}
    for path in asked.get("paths", []):
        try:
            mode = Path(path).stat()
        except OSError:
            report["paths"][path] = {"kind": "missing"}
            continue
        if stat.S_ISCHR(mode.st_mode):
            device = f"{os.major(mode.st_rdev)}:{os.minor(mode.st_rdev)}"
            report["paths"][path] = {"kind": "char", "device": device}
        else:
            with Path(path).open("rb") as handle:
                report["paths"][path] = {"kind": "file", "text": handle.read(64).decode()}
    return report


def main():
    raw = Path(env("INPUT_FILE")).read_bytes()
    behaviour = json.loads(raw) if raw.strip() else {}
    print(behaviour.get("log", "behave: started"), flush=True)
    print("behave: on stderr", file=sys.stderr, flush=True)
    held = []
    for _ in range(int(behaviour.get("allocate_mb", 0))):
        held.append(b"\x01" * (1024 * 1024))  # written, so the pages are really used
    time.sleep(float(behaviour.get("sleep", 0)))
    output = Path(env("OUTPUT_FILE"))
    text = str(behaviour.get("output", ""))
    if "env" in behaviour:
        seen = {name: env(name) if name in os.environ else None for name in behaviour["env"]}
        text = json.dumps(seen)
    if behaviour.get("describe"):
        text = json.dumps(describe(behaviour["describe"]))
    output.write_text(text)
    if behaviour.get("output_size"):
        os.truncate(output, int(behaviour["output_size"]))
    if behaviour.get("output_link"):
        try:
            output.unlink()
            output.symlink_to(behaviour["output_link"])
        except OSError as error:
            print(f"behave: cannot replace the output with a link: {error}", flush=True)
            sys.exit(LINK_REFUSED)
        print(f"behave: the output is now a link to {behaviour['output_link']}", flush=True)
    sys.exit(int(behaviour.get("exit_code", 0)))


main()
