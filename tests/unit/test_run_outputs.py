"""What the node reads back from a run's folder: never through a link, never unbounded.

These play the part of a run (or anyone else) that could change the run's folder on the
node's side; the executors' own tests show that a real container cannot get there at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from executors.outputs import LogTail, read_log_tail
from executors.podman.api import Demultiplexer, demultiplex
from executors.runfiles import RunFiles
from executors.spec import RunSpec

MIB = 1024 * 1024


@pytest.fixture
def files(tmp_path: Path) -> RunFiles:
    files = RunFiles(tmp_path, 7)
    files.prepare(RunSpec(run_id=7, task_id=1, organization_id=1, collaboration_id=1, image="x"))
    return files


async def test_a_plain_output_under_the_limit_is_read(files: RunFiles) -> None:
    files.output.write_bytes(b'{"sum": 1}')

    read = await files.read_output(limit=1024)

    assert read == (b'{"sum": 1}', "")


async def test_an_output_replaced_by_a_link_to_a_secret_is_refused_unread(
    files: RunFiles, tmp_path: Path
) -> None:
    secret = tmp_path / "private_key.pem"
    secret.write_text("FEDNODE_API_KEY=secret")
    files.output.unlink()
    files.output.symlink_to(secret)

    read = await files.read_output(limit=1024)

    assert read.data == b""
    assert "symbolic link" in read.refused


async def test_a_run_folder_replaced_by_a_link_is_refused(files: RunFiles, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "output").write_text("another run's input")
    files.remove()
    files.directory.symlink_to(elsewhere)

    read = await files.read_output(limit=1024)

    assert read.data == b""
    assert "not a plain directory" in read.refused


async def test_a_hard_link_and_a_pipe_are_refused_and_a_pipe_does_not_block(
    files: RunFiles, tmp_path: Path
) -> None:
    files.output.unlink()
    os.link(files.input, files.output)
    assert "2 hard links" in (await files.read_output(limit=1024)).refused

    files.output.unlink()
    os.mkfifo(files.output)
    assert "a pipe" in (await files.read_output(limit=1024)).refused


async def test_a_sparse_output_over_the_limit_is_refused_with_both_sizes_without_reading_it(
    files: RunFiles,
) -> None:
    os.truncate(files.output, 3 * 1024 * MIB)  # 3 GiB, no blocks

    read = await files.read_output(limit=64 * MIB)

    assert read.data == b""
    assert read.refused == (
        f"the run's output is {3 * 1024 * MIB} bytes, over the node's limit of {64 * MIB} "
        "(setting max_output_bytes)"
    )


async def test_a_missing_folder_or_output_is_an_empty_output(tmp_path: Path) -> None:
    assert await RunFiles(tmp_path, 99).read_output(limit=10) == (b"", "")


def test_prepare_replaces_a_planted_link_instead_of_writing_through_it(
    files: RunFiles, tmp_path: Path
) -> None:
    target = tmp_path / "node.yaml"
    target.write_text("operator's config")
    files.input.unlink()
    files.input.symlink_to(target)

    files.prepare(
        RunSpec(run_id=7, task_id=1, organization_id=1, collaboration_id=1, image="x", input=b"i")
    )

    assert target.read_text() == "operator's config"
    assert not files.input.is_symlink()
    assert files.input.read_bytes() == b"i"


async def test_a_long_log_file_keeps_its_end_with_a_note(tmp_path: Path) -> None:
    folder = tmp_path / "run-1" / "state"
    folder.mkdir(parents=True)
    (folder / "log").write_bytes(b"a" * 5000 + b"the error at the end\n")

    text = await read_log_tail(tmp_path, "run-1/state", "log", limit=1024)

    assert text.endswith("the error at the end\n")
    assert text.startswith(
        "fednode: the log is 5021 bytes; its first 3997 bytes are left out "
        "(the node keeps the last 1024, setting max_log_bytes)\n"
    )
    assert await read_log_tail(tmp_path, "run-1/state", "missing", limit=1024) == ""


def test_a_streamed_log_keeps_its_end_in_bounded_memory() -> None:
    tail = LogTail(1024)
    for index in range(10_000):
        tail.feed(f"line {index}\n".encode())

    text = tail.text()

    assert text.endswith("line 9999\n")
    assert len(text.splitlines()[-1]) < 20
    assert "its first" in text.splitlines()[0]
    assert len(tail._kept) <= 2 * 1024


def test_a_multiplexed_podman_log_split_anywhere_demultiplexes_the_same() -> None:
    frames = b"".join(
        bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload
        for stream, payload in ((1, b"out one\n"), (2, b"err\n"), (1, b"out two\n"))
    )
    for size in (1, 3, 8, 9, 100):
        demultiplexer = Demultiplexer()
        pieces = [frames[i : i + size] for i in range(0, len(frames), size)]
        joined = b"".join(demultiplexer.feed(piece) for piece in pieces) + demultiplexer.end()
        assert joined == b"out one\nerr\nout two\n", size
    assert demultiplex(b"plain text log\n") == b"plain text log\n"
