"""WireGuard constants.

The first block is the protocol (whitepaper section 6 and wireguard-go's
constants.go); changing any of it breaks interoperability. The second block is
this implementation's own limits.
"""

from typing import Final

# --- from the protocol -----------------------------------------------------
CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME: Final = 120.0
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
REKEY_TIMEOUT_JITTER_MAX: Final = 0.334
KEEPALIVE_TIMEOUT: Final = 10.0
COOKIE_REFRESH_TIME: Final = 120.0
# An initiator whose session is this old rekeys on receive (wireguard-go's
# keepKeyFreshReceiving): 180 - 10 - 5 = 165 s.
REKEY_ON_RECEIVE_AGE: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
# Keys are wiped when no new session was derived for 3 * REJECT_AFTER_TIME.
ZERO_KEYS_AFTER: Final = REJECT_AFTER_TIME * 3
# At most 50 initiations per second are consumed from one peer.
INITIATION_MIN_INTERVAL: Final = 1.0 / 50
# Retries: 90 s of attempts at 5 s spacing.
MAX_HANDSHAKE_ATTEMPTS: Final = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)

MSG_INITIATION: Final = 1
MSG_RESPONSE: Final = 2
MSG_COOKIE_REPLY: Final = 3
MSG_TRANSPORT: Final = 4

INITIATION_SIZE: Final = 148
RESPONSE_SIZE: Final = 92
COOKIE_REPLY_SIZE: Final = 64
TRANSPORT_HEADER_SIZE: Final = 16
TAG_SIZE: Final = 16
TRANSPORT_MIN_SIZE: Final = TRANSPORT_HEADER_SIZE + TAG_SIZE
PADDING_MULTIPLE: Final = 16

# Replay window: a ring of 128 blocks of 64 bits; the newest block is being
# filled, so (128 - 1) * 64 = 8128 counters behind the highest are accepted.
REPLAY_BLOCK_BITS: Final = 64
REPLAY_RING_BLOCKS: Final = 128
REPLAY_WINDOW: Final = (REPLAY_RING_BLOCKS - 1) * REPLAY_BLOCK_BITS

# --- this implementation's limits -------------------------------------------
DEFAULT_MTU: Final = 1420
# Packets kept per peer while a handshake is pending (wireguard-go: 128).
MAX_STAGED_PACKETS: Final = 128
# The cookie secret rotates this often (whitepaper: every two minutes).
COOKIE_SECRET_LIFETIME: Final = 120.0
