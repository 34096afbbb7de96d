"""TensorBoard scalar logs, written from scratch (no TensorFlow or tensorboard package needed).

An event file is a sequence of TFRecords, each holding one protobuf `Event`.
We only ever write two kinds: the header event (`file_version`) and scalar
summaries, so the protobuf encoding is done by hand:

    Event        { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary      { repeated Value value = 1; }
    Summary.Value{ string tag = 1; float simple_value = 2; }

A TFRecord is: uint64 length, masked CRC-32C of the length, the data,
masked CRC-32C of the data (all little-endian).
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _event(wall_time: float, step: int = 0, file_version: str | None = None, scalars: dict | None = None) -> bytes:
    message = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        message += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items()
        )
        message += _length_delimited(5, values)
    return message


class EventWriter:
    """Appends scalar summaries to an event file that TensorBoard reads."""

    def __init__(self, log_dir: str | Path):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = log_dir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        self._file = open(self.path, "ab")
        self._write(_event(now, file_version="brain.Event:2"))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._write(_event(time.time(), step, scalars={k: float(v) for k, v in scalars.items()}))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
