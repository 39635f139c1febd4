"""The WireGuard protocol, sans-IO: see device.py (inbound) and peer.py (outbound)."""

from .crypto import derive_psk
from .device import Device, DeviceError
from .events import Event, HandshakeCompleted, HandshakeGaveUp, KeysZeroed, NewSource
from .messages import MessageError
from .peer import Peer

__all__ = [
    "Device", "DeviceError", "Peer", "MessageError", "derive_psk",
    "Event", "HandshakeCompleted", "HandshakeGaveUp", "KeysZeroed", "NewSource",
]
