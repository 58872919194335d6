"""Wire format between the Slicer process and the engine worker: frames of a JSON header and raw arrays.

A frame is ``MAGIC (4 bytes) | header length (u64) | payload length (u64) | header | payload`` (little
endian). The header is UTF-8 JSON ``{"message": <value>, "buffers": [[dtype, shape, offset, nbytes, bits],
...]}``; the payload holds the arrays' bytes, each at a 16-byte aligned offset. Values are encoded by
:func:`to_wire`:

* ``None``, bool, int, float (NaN/inf included), str, list: as themselves (numpy scalars become Python ones);
* ``numpy.ndarray`` -> ``{"$nd": n}`` (buffer ``n``; bool arrays travel bit-packed, ``bits`` = True);
* tuple -> ``{"$tuple": [...]}``; a dict whose keys are not all plain strings -> ``{"$map": [[k, v], ...]}``;
* an instance of one of the dataclasses in :data:`DATACLASSES` -> ``{"$dc": name, "f": {field: value}}``.

Nothing else is accepted, and decoding only ever builds those types: no code is unpickled. Decoded arrays
are writable views into the received frame (no copy). numpy only: this module is imported in Slicer.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import struct
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

MAGIC = b"RMW1"
_PREFIX = struct.Struct("<4sQQ")
_ALIGN = 16
#: largest frame parts accepted: far above any real message, low enough that a corrupt length is an error
#: rather than an attempt to allocate exabytes
MAX_HEADER_BYTES = 1 << 30
MAX_PAYLOAD_BYTES = 1 << 36
#: dataclasses that may cross the wire: name -> "module:attribute" (imported lazily, on first use)
DATACLASSES = {
    "Prompt": "RobustMedSAMLib.prompts:Prompt",
    "Prediction": "RobustMedSAMLib.prompts:Prediction",
    "ObjectPrompts": "RobustMedSAMLib.prompt_files:ObjectPrompts",
    "SliceRecord": "RobustMedSAMLib.propagation_types:SliceRecord",
    "StopReason": "RobustMedSAMLib.propagation_types:StopReason",
    "PropagationResult": "RobustMedSAMLib.propagation_types:PropagationResult",
    "ObjectResult": "RobustMedSAMLib.volume_results:ObjectResult",
    "VolumeResult": "RobustMedSAMLib.volume_results:VolumeResult",
    "RobustnessRow": "RobustMedSAMLib.robustness:RobustnessRow",
}
_DTYPES = {"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"}
_classes: Dict[str, type] = {}


class ProtocolError(RuntimeError):
    """A frame or value that this protocol cannot carry (corrupt stream, unknown type, bad dtype)."""


def _dataclass(name: str) -> type:
    cls = _classes.get(name)
    if cls is None:
        if name not in DATACLASSES:
            raise ProtocolError(f"unknown type {name!r} on the wire")
        module, attr = DATACLASSES[name].split(":")
        cls = _classes[name] = getattr(importlib.import_module(module), attr)
    return cls


def _name_of(obj: Any) -> str:
    cls = type(obj)
    for name, path in DATACLASSES.items():
        module, attr = path.split(":")
        if cls.__name__ == attr and cls.__module__ == module:
            _classes.setdefault(name, cls)
            return name
    raise ProtocolError(f"{cls.__module__}.{cls.__qualname__} cannot be sent to or from the engine worker")


# ------------------------------------------------------------------------------------------- values
def to_wire(value: Any, buffers: List[np.ndarray]) -> Any:
    """A JSON-able form of ``value``; arrays are appended to ``buffers`` and referenced by index."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        buffers.append(value)
        return {"$nd": len(buffers) - 1}
    if isinstance(value, tuple):
        return {"$tuple": [to_wire(v, buffers) for v in value]}
    if isinstance(value, list):
        return [to_wire(v, buffers) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: to_wire(v, buffers) for k, v in value.items()}
        return {"$map": [[to_wire(k, buffers), to_wire(v, buffers)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = _name_of(value)
        return {"$dc": name, "f": {f.name: to_wire(getattr(value, f.name), buffers)
                                   for f in dataclasses.fields(value) if f.init}}
    raise ProtocolError(f"a {type(value).__name__} cannot be sent to or from the engine worker")


def from_wire(value: Any, arrays: Sequence[np.ndarray]) -> Any:
    """Inverse of :func:`to_wire`."""
    if isinstance(value, list):
        return [from_wire(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "$nd" in value:
        return arrays[value["$nd"]]
    if "$tuple" in value:
        return tuple(from_wire(v, arrays) for v in value["$tuple"])
    if "$map" in value:
        return {_hashable(from_wire(k, arrays)): from_wire(v, arrays) for k, v in value["$map"]}
    if "$dc" in value:
        cls = _dataclass(value["$dc"])
        return cls(**{k: from_wire(v, arrays) for k, v in value["f"].items()})
    return {k: from_wire(v, arrays) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


# ------------------------------------------------------------------------------------------- frames
def _wire_array(array: np.ndarray) -> Tuple[np.ndarray, str, bool]:
    a = np.asarray(array)
    if a.dtype == bool:
        return np.packbits(a.reshape(-1)), "|b1", True
    wire = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    if wire.str not in _DTYPES:
        raise ProtocolError(f"arrays of dtype {a.dtype} cannot be sent to the engine worker")
    return np.ascontiguousarray(a, dtype=wire), wire.str, False


def encode_frame(message: Any) -> List[memoryview]:
    """``message`` -> the frame's pieces (write them in order); array data is not copied."""
    arrays: List[np.ndarray] = []
    body = to_wire(message, arrays)
    metas, pieces, offset = [], [], 0
    for array in arrays:
        data, dtype, bits = _wire_array(array)
        pad = (-offset) % _ALIGN
        if pad:
            pieces.append(memoryview(bytes(pad)))
            offset += pad
        metas.append([dtype, list(np.shape(array)), offset, int(data.nbytes), bits])
        if data.nbytes:
            pieces.append(memoryview(data.reshape(-1)).cast("B"))
        offset += int(data.nbytes)
    header = json.dumps({"message": body, "buffers": metas}, separators=(",", ":")).encode("utf-8")
    return [memoryview(_PREFIX.pack(MAGIC, len(header), offset)), memoryview(header)] + pieces


def frame_bytes(message: Any) -> bytes:
    """The whole frame as one ``bytes`` (tests, small messages)."""
    return b"".join(bytes(p) for p in encode_frame(message))


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"corrupt frame: {what} {value!r}")
    return value


def _array(meta, payload: memoryview) -> np.ndarray:
    """One array of a frame from its ``[dtype, shape, offset, nbytes, bits]`` entry (every field checked)."""
    if not isinstance(meta, list) or len(meta) != 5:
        raise ProtocolError("corrupt frame: bad array entry")
    dtype, shape, offset, nbytes, bits = meta
    if dtype not in _DTYPES or not isinstance(shape, list) or not isinstance(bits, bool):
        raise ProtocolError(f"corrupt frame: array of dtype {dtype!r}, shape {shape!r}")
    shape = tuple(_int(n, "array dimension") for n in shape)
    offset, nbytes = _int(offset, "array offset"), _int(nbytes, "array size")
    count = 1
    for n in shape:
        count *= n
    expected = (count + 7) // 8 if bits else count * np.dtype(dtype).itemsize
    if nbytes != expected or offset + nbytes > len(payload):
        raise ProtocolError(f"corrupt frame: array {shape} of {dtype} in {nbytes} bytes at {offset} "
                            f"(payload {len(payload)} bytes)")
    raw = payload[offset:offset + nbytes]
    if bits:
        return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=count).astype(bool).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)


class UndecodableMessage:
    """A complete frame whose message could not be rebuilt (:attr:`error`); :attr:`id` is the message's
    ``id`` where its header could be read. The stream itself is intact: the next frame is read normally."""

    def __init__(self, error: str, id: Any = None) -> None:
        self.error, self.id = error, id

    def __repr__(self) -> str:
        return f"<UndecodableMessage id={self.id!r}: {self.error}>"


def decode_body(body: bytearray, header_length: int) -> Any:
    """The message of a frame's body (header + payload, without the 20-byte prefix); ProtocolError when the
    header, an array entry or a value is not what :func:`encode_frame` writes (the error's ``message_id`` is
    the message's id where the header could be read)."""
    try:
        head = json.loads(bytes(body[:header_length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"corrupt frame header: {e}") from None
    if not isinstance(head, dict) or not isinstance(head.get("buffers"), list) or "message" not in head:
        raise ProtocolError("corrupt frame header: not a message")
    message = head["message"]
    message_id = message.get("id") if isinstance(message, dict) else None
    try:
        payload = memoryview(body)[header_length:]
        arrays = [_array(meta, payload) for meta in head["buffers"]]
        return from_wire(message, arrays)
    except ProtocolError as e:
        e.message_id = message_id
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError) as e:
        error = ProtocolError(f"a value of the message could not be rebuilt ({type(e).__name__}: {e})")
        error.message_id = message_id
        raise error from None


class FrameReader:
    """Incremental frame parser: :meth:`feed` bytes as they arrive, get the complete messages back.

    A frame whose message cannot be rebuilt comes back as an :class:`UndecodableMessage` (the stream goes
    on); a broken stream (no frame marker, impossible lengths) raises :class:`ProtocolError`, whose
    ``messages`` are the messages completed before the break."""

    def __init__(self) -> None:
        self._prefix = bytearray()
        self._body: bytearray = bytearray()
        self._header_length = 0
        self._filled = -1  # -1: waiting for a prefix
        self._last_prefix = bytearray()
        self._broken = ""  # why the stream cannot be read any further

    @property
    def in_frame(self) -> bool:
        """True while a frame has been started but not completed."""
        return self._filled >= 0 or bool(self._prefix)

    def feed(self, data) -> List[Any]:
        messages: List[Any] = []
        if self._broken:
            error = ProtocolError(self._broken)
            error.messages = messages
            raise error
        view = memoryview(data).cast("B")
        pos, n = 0, len(view)
        while pos < n:
            if self._filled < 0:
                take = view[pos:pos + _PREFIX.size - len(self._prefix)]
                self._prefix += take
                pos += len(take)
                if len(self._prefix) < _PREFIX.size:
                    break
                magic, header_length, payload_length = _PREFIX.unpack(bytes(self._prefix))
                self._last_prefix, self._prefix = self._prefix, bytearray()
                if magic != MAGIC:
                    self._broken = (f"the stream is corrupt: a frame starts with {bytes(self._last_prefix)!r} "
                                    f"instead of the frame marker (something else wrote into it)")
                elif header_length > MAX_HEADER_BYTES or payload_length > MAX_PAYLOAD_BYTES:
                    self._broken = f"the stream is corrupt: a frame of {header_length} + {payload_length} bytes"
                if self._broken:
                    error = ProtocolError(self._broken)
                    error.messages = messages
                    raise error
                self._header_length = header_length
                self._body = bytearray(header_length + payload_length)
                self._filled = 0
            take = view[pos:pos + len(self._body) - self._filled]
            self._body[self._filled:self._filled + len(take)] = take
            self._filled += len(take)
            pos += len(take)
            if self._filled == len(self._body):
                body, self._body, self._filled = self._body, bytearray(), -1
                try:
                    messages.append(decode_body(body, self._header_length))
                except ProtocolError as e:
                    messages.append(UndecodableMessage(str(e), getattr(e, "message_id", None)))
        return messages
