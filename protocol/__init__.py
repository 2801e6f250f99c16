"""Everything that crosses a process boundary: messages, tensor framing, and the ZeroMQ peer bus.

Imports only the standard library, msgpack, numpy and pyzmq (never torch, store or agents), so any
process, including the store's readers, can use it cheaply.
"""
from protocol.bus import PeerBus, process_context
from protocol.messages import (
    MAX_LIST_LEN,
    MAX_MESSAGE_BYTES,
    MAX_STRING_LEN,
    PROTOCOL_VERSION,
    Bye,
    Hello,
    Message,
    ProtocolError,
    Published,
    decode,
    encode,
    message_kinds,
    register_message,
)
from protocol.tensors import (
    DTYPES,
    RawTensor,
    blob_key,
    decode_blob,
    encode_blob,
    frame_tensors,
    itemsize,
    pack_header,
    unframe_tensors,
    unpack_header,
)

__all__ = [
    "MAX_LIST_LEN",
    "MAX_MESSAGE_BYTES",
    "MAX_STRING_LEN",
    "PROTOCOL_VERSION",
    "DTYPES",
    "Bye",
    "Hello",
    "Message",
    "PeerBus",
    "ProtocolError",
    "Published",
    "RawTensor",
    "blob_key",
    "decode",
    "decode_blob",
    "encode",
    "encode_blob",
    "frame_tensors",
    "itemsize",
    "message_kinds",
    "pack_header",
    "process_context",
    "register_message",
    "unframe_tensors",
    "unpack_header",
]
