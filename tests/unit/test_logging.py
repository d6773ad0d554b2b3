"""Logging: JSON lines off a terminal, with bound run ids and stdlib loggers included."""

from __future__ import annotations

import io
import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from node.logging import bind_run, configure_logging, direct_logger, get_logger


def lines_of(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_events_are_json_with_level_time_and_keys() -> None:
    out = io.StringIO()
    configure_logging(level="INFO", fmt="auto", stream=out)
    get_logger("fednode.test").info("run.started", image="localhost/x")
    (line,) = lines_of(out)
    assert line["event"] == "run.started"
    assert line["image"] == "localhost/x"
    assert line["level"] == "info"
    assert line["logger"] == "fednode.test"
    assert "timestamp" in line


def test_bound_run_ids_appear_on_every_line_inside_the_block() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    log = get_logger("fednode.test")
    with bind_run(run_id=7, task_id=3):
        log.info("inside")
        logging.getLogger("aiohttp.client").warning("library line")
    log.info("outside")
    inside, library, outside = lines_of(out)
    assert (inside["run_id"], inside["task_id"]) == (7, 3)
    assert library["run_id"] == 7 and library["event"] == "library line"
    assert library["logger"] == "aiohttp.client"
    assert "run_id" not in outside


def test_lines_of_a_bound_run_carry_its_spans_trace_and_span_ids() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    log = get_logger("fednode.test")
    tracer = TracerProvider().get_tracer("test")
    run_span = tracer.start_span("run")
    with bind_run(run_id=7, task_id=3, span=run_span):
        log.info("in the run")
        with tracer.start_as_current_span("start") as step:
            logging.getLogger("aiohttp.client").warning("library line in a step")
    log.info("outside")
    run_line, step_line, outside = lines_of(out)
    run_context, step_context = run_span.get_span_context(), step.get_span_context()
    assert run_line["trace_id"] == format(run_context.trace_id, "032x")
    assert run_line["span_id"] == format(run_context.span_id, "016x")
    assert step_line["trace_id"] == run_line["trace_id"]
    assert step_line["span_id"] == format(step_context.span_id, "016x")
    assert "trace_id" not in outside and "span_id" not in outside
    assert run_span.is_recording()  # bind_run does not end the run's span


def test_level_filters_debug() -> None:
    out = io.StringIO()
    configure_logging(level="WARNING", fmt="json", stream=out)
    get_logger("x").info("hidden")
    get_logger("x").warning("shown")
    assert [line["event"] for line in lines_of(out)] == ["shown"]


def test_console_format_is_not_json() -> None:
    out = io.StringIO()
    configure_logging(fmt="console", stream=out)
    get_logger("x").info("hello", run_id=1)
    text = out.getvalue()
    assert "hello" in text and "run_id" in text
    assert not text.lstrip().startswith("{")


def test_a_direct_logger_writes_the_same_line_at_the_same_level() -> None:
    out = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=out)
    get_logger("proxy.access").info("proxy.request", status=200)
    direct = direct_logger("proxy.access")
    direct.info("proxy.request", status=200)
    direct.debug("hidden")
    with bind_run(run_id=5):
        direct.info("bound")
    through_stdlib, straight, bound = lines_of(out)
    for line in (through_stdlib, straight):
        line.pop("timestamp")
    assert straight == through_stdlib
    assert bound["run_id"] == 5


def test_values_of_secret_named_keys_and_uri_passwords_never_reach_a_log_line() -> None:
    out = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=out)
    get_logger("x").info(
        "pull",
        image="harbor.example.org/a:1",
        environment={"APPTAINER_DOCKER_PASSWORD": "pw-1", "HOME": "/root"},
        headers={"X-Registry-Auth": "pw-2"},
        api_key="pw-3",
        uri="postgresql://me:pw-4@db/x",
    )
    logging.getLogger("aiohttp.client").warning("library", extra={"client_secret": "pw-5"})
    text = out.getvalue()
    for secret in ("pw-1", "pw-2", "pw-3", "pw-4", "pw-5"):
        assert secret not in text
    first = lines_of(out)[0]
    assert first["image"] == "harbor.example.org/a:1"
    assert first["environment"] == {"APPTAINER_DOCKER_PASSWORD": "***", "HOME": "/root"}
