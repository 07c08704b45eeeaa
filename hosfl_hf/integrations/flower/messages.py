"""Protocol messages in Flower `Message`s: each payload is the codec's bytes in one `ConfigRecord`."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from ...protocol import weights_digest

RECORD = "hosfl"


def pack(**payloads: bytes | int | str) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord(dict(payloads))})


def unpack(message: Message, key: str):
    if message.has_error():
        raise RuntimeError(f"The client answered with an error: {message.error.reason}")
    record = message.content.config_records.get(RECORD)
    if record is None or key not in record:
        raise ValueError(f"The message holds no {key!r} payload.")
    return record[key]


def digest(parameters) -> str:
    """sha256 of trainable weights in their pinned order (see [`hosfl_hf.protocol.weights_digest`])."""
    return weights_digest(parameters)
