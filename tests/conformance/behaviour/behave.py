"""A test algorithm that does what its input says (the executor conformance suite's probe).

Input: one JSON object, all keys optional: ``exit_code`` (default 0), ``sleep`` (seconds),
``allocate_mb`` (touch this much memory, then hold it), ``output`` (text written to the
output file), ``log`` (a line for stdout; one also goes to stderr). It follows the
vantage6 4.x file contract (``INPUT_FILE``, ``OUTPUT_FILE``; values may be base32-encoded
with ``=`` as ``!``), so every executor runs it like any algorithm.
"""

import base64
import binascii
import json
import os
import sys
import time
from pathlib import Path


def env(name):
    value = os.environ[name]
    try:
        return base64.b32decode(value.replace("!", "=")).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return value


def main():
    raw = Path(env("INPUT_FILE")).read_bytes()
    behaviour = json.loads(raw) if raw.strip() else {}
    print(behaviour.get("log", "behave: started"), flush=True)
    print("behave: on stderr", file=sys.stderr, flush=True)
    held = []
    for _ in range(int(behaviour.get("allocate_mb", 0))):
        held.append(b"\x01" * (1024 * 1024))  # written, so the pages are really used
    time.sleep(float(behaviour.get("sleep", 0)))
    Path(env("OUTPUT_FILE")).write_text(str(behaviour.get("output", "")))
    sys.exit(int(behaviour.get("exit_code", 0)))


main()
