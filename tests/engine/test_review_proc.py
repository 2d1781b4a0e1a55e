"""Review of the engine process's intake (service.engine.proc): a peer's message of
another shape among good frames is dropped alone; the input thread goes on."""

from __future__ import annotations

import asyncio

import zmq

from service.contract.protocol import StepRequest, request_encoder
from service.engine.client import ZmqClient, socket_addresses
from tests.engine.test_engine_proc import EngineProcess, client, engine  # noqa: F401


async def test_a_message_of_other_parts_is_dropped_and_the_engine_goes_on(
    engine: EngineProcess,  # noqa: F811
    client: ZmqClient,  # noqa: F811
) -> None:
    context = zmq.Context()
    rogue = context.socket(zmq.DEALER)
    rogue.connect(socket_addresses(engine.address)[0])
    good = request_encoder.encode([StepRequest(1, "lstm", [5], 3)])
    rogue.send_multipart([good, good])  # two parts after the identity: not a frame
    rogue.close(linger=1000)
    context.term()
    answer = await asyncio.wait_for(
        client.call(StepRequest(client.next_id(), "lstm", [5, 6], 3)), 30
    )
    assert answer.error is None and len(answer.ids) == 3
