"""Runs `imagegen` with librdkafka's consumer-group debug log in the process's output.

For the tests whose failures are group joins that never settle (`tests/test_fleet.py`):
CI keeps only the report, and the report shows the tail of each service's output, so the
state each consumer's join was stuck in has to be in that output.
"""

import logging
import runpy
import sys
from typing import Any

import imagegen.infra.kafka as kafka

_settings_config = kafka._base


def _with_group_debug(settings: Any, role: str) -> dict[str, Any]:
    config = _settings_config(settings, role)
    if role == "consumer":
        config["debug"] = "cgrp"
    return config


# librdkafka logs through this logger at DEBUG; the service's log level stays info for the rest.
_log = logging.getLogger("imagegen.librdkafka")
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(asctime)s librdkafka %(message)s"))
_log.addHandler(_handler)
_log.setLevel(logging.DEBUG)
_log.propagate = False
kafka._base = _with_group_debug
runpy.run_module("imagegen", run_name="__main__", alter_sys=True)
