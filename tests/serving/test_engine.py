"""The continuous-batching engine: greedy outputs are registry.generate's token for token, whatever
shares the batch and whenever a row joins; per-row sampling, stop strings, streaming, back-pressure."""

import time

import pytest

from lexlora.serving.engine import Engine
from tests.serving import served
from tests.serving.served import DESC_INPUTS, FILES_INPUTS

adapters = served.adapters
MORE_INPUTS = ["notes.txt", "a_rather_long_file_name_for_a_module.py", "x", "Makefile.am", "LICENSE"]


@pytest.fixture()
def engine(adapters):
    engine = Engine(adapters[2], max_rows=4)
    yield engine
    engine.close()


def expected(registry, adapter, inputs, **kwargs):
    return registry.generate(inputs, adapter=adapter, **kwargs)


def test_outputs_match_registry_generate_for_every_mix_and_arrival(adapters, engine):
    registry = adapters[2]
    jobs = [("desc", DESC_INPUTS), ("plain", MORE_INPUTS), ("files", FILES_INPUTS), ("desc", MORE_INPUTS[:2]),
            ("plain", DESC_INPUTS), ("files", FILES_INPUTS[:1])]
    wanted = [expected(registry, a, i) for a, i in jobs]
    # 4 slots for 16 rows: rows join while others are mid-sequence, and slots are reused.
    requests = []
    for adapter, inputs in jobs:
        requests.append(engine.submit(adapter, inputs))
        time.sleep(0.01)
    assert [r.future.result(60) for r in requests] == wanted
    assert engine.stats["mixed_batches"] > 0 and engine.stats["rows"] == sum(len(i) for _, i in jobs)


def test_rows_admitted_together_match_too(adapters, engine):
    registry = adapters[2]
    with engine.paused():
        requests = [engine.submit("desc", DESC_INPUTS), engine.submit("plain", DESC_INPUTS),
                    engine.submit("files", FILES_INPUTS)]
    assert [r.future.result(60) for r in requests] == [
        expected(registry, "desc", DESC_INPUTS), expected(registry, "plain", DESC_INPUTS),
        expected(registry, "files", FILES_INPUTS)]
