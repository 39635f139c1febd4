"""What stands in front of the coordinator's handlers (tunnelmesh.coordinator.service):
every failure answered as a JSON error (never a traceback), the rate limit of the
endpoints that take requests without a signature, and aiohttp's log of requests it cannot
parse, counted and said once per source a minute. Client-influenced text is logged only
through `loggable`."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from tunnelmesh.identity import IdentityError
from tunnelmesh.links import RefusalLog
from tunnelmesh.membership import MembershipError
from tunnelmesh.ratelimit import Rate, RateLimiter, source_key

from .store import StoreError

log = logging.getLogger("tunnelmesh.coordinator.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY = 256 * 1024


class Refused(Exception):
    """A request answered with an error status; `extra` joins the JSON error body."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def loggable(text: str, limit: int = 300) -> str:
    """Client-influenced text made safe for one log line: bounded, control characters escaped."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("unicode_escape").decode("ascii")


def errors(client_address: Callable[[web.Request], str | None]) -> Any:
    """Middleware: every failure is a JSON error with a fitting status; never a traceback.
    A refusal is logged once per source, endpoint and status a minute (RefusalLog: with how
    many were not), so a client sending bad requests in a loop cannot flood the log."""
    log_refusal = RefusalLog(log)

    def refused(request: web.Request, where: str, status: int, message: str) -> None:
        source = source_key(client_address(request))
        log_refusal(source, f"{where} {status}", f"{where} refused ({status}) from {source}: {loggable(message)}")

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        where = loggable(f"{request.method} {request.path}")
        try:
            return await handler(request)
        except Refused as exc:
            refused(request, where, exc.status, exc.message)
            return web.json_response({"error": exc.message, **exc.extra}, status=exc.status)
        except (MembershipError, IdentityError) as exc:
            refused(request, where, 400, str(exc))
            return web.json_response({"error": str(exc)}, status=400)
        except StoreError as exc:
            log.error("%s: %s", where, exc)
            told = str(exc) if exc.where is None else str(exc).replace(exc.where, "(its PostgreSQL database)")
            return web.json_response({"error": told}, status=503)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = (f"the body is larger than {MAX_BODY // 1024} KiB" if exc.status == 413
                       else f"{request.method} {request.path}: {exc.reason.lower()}")
            return web.json_response({"error": message}, status=exc.status)
        except Exception:
            log.exception("%s: internal error", where)
            return web.json_response({"error": "internal error in the coordinator (see its log)"}, status=500)

    return errors


#: The endpoints that take requests without a signature (the relay until its challenge is
#: answered; set-up, whose body is parsed and checked before its admin signature can be,
#: since the body names the admin key): each request there is charged to its source
#: address (tunnelmesh.ratelimit).
UNAUTHENTICATED_PATHS = frozenset({"/v1/network", "/v1/join/propose", "/v1/join/confirm", "/v1/join/request",
                                   "/relay", "/v1/admin/setup", "/v1/cluster/relay"})
#: Per source: a joiner makes a handful of requests and one that waits for approval asks
#: every 2 s (0.5/s) for up to 10 min; members behind one NAT share an address. Overall:
#: what bounds the work these endpoints can cost, whoever sends (each request checks at
#: most a few signatures and parses at most MAX_BODY of JSON: a few ms at worst).
PER_SOURCE_RATE = Rate(per_second=1.0, burst=30)
OVERALL_RATE = Rate(per_second=20.0, burst=100)
#: Sources tracked at once (about 200 bytes each); beyond, the least recently seen goes.
MAX_SOURCES = 4096
#: The largest body a request without a signature may carry: a join's is a few KiB (an
#: RSA-8192 identity line and proof under 8 KiB); parsing 256 KiB of JSON costs up to 13 ms.
UNAUTHENTICATED_MAX_BODY = 32 * 1024
#: The rate limiter of a running app, for its counters (`limiter.refused`).
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)


def rate_limited(client_address: Callable[[web.Request], str | None], limiter: RateLimiter,
                 monotonic: Callable[[], float]) -> Any:
    """Middleware: refuse a request to an unauthenticated endpoint with 429 and Retry-After
    when its source (behind a trusted proxy: the X-Forwarded-For address) or everyone
    together sent too many, before anything else is done for it; let through, its body may
    be at most UNAUTHENTICATED_MAX_BODY (413)."""
    log_refusal = RefusalLog(log)

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in UNAUTHENTICATED_PATHS:
            return await handler(request)
        source = client_address(request)
        refused = limiter.limit(source, monotonic())
        if refused is None:
            if request.method == "GET":
                return await handler(request)  # no body (and /relay's WebSocket upgrade stays as it is)
            try:
                return await handler(request.clone(client_max_size=UNAUTHENTICATED_MAX_BODY))
            except web.HTTPRequestEntityTooLarge:
                raise Refused(413, f"the body is larger than {UNAUTHENTICATED_MAX_BODY // 1024} KiB, the most "
                                   "a request without a signature may carry") from None
        seconds = max(1, math.ceil(refused.wait))
        if refused.by == "source":
            error = f"too many requests from {source or 'this address'}: try again in {seconds} s"
            hint = (" (if every client seems to come from this address, the coordinator is behind a reverse "
                    "proxy it does not trust: see --trusted-proxy)")
        else:
            error = f"the coordinator is busy (too many requests without a signature): try again in {seconds} s"
            hint = ""
        where = source_key(source)
        log_refusal(where, refused.by, f"rate limit: refused {loggable(request.path)} from {where}: "
                                       f"{error} ({limiter.refused[refused.by]} refused so far){hint}")
        return web.json_response({"error": error}, status=429, headers={"Retry-After": str(seconds)})

    return limit


class MalformedRequests(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger for the coordinator. A request aiohttp cannot parse (broken
    framing, a bad method, an oversize header: HttpProcessingError) comes from the client,
    not from a bug: it is counted (`count`) and logged as one line, once per source and
    minute (RefusalLog), never with a traceback. Anything else is logged as aiohttp would."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.count = 0
        self._log_refusal = RefusalLog(log)

    def log(self, level: int, msg: object, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        if not isinstance(exc_info, HttpProcessingError):
            super().log(level, msg, *args, exc_info=exc_info, **kwargs)
            return
        self.count += 1
        # aiohttp passes the request's remote address as the one argument of this message
        where = source_key(args[0] if args and isinstance(args[0], str) else None)
        self._log_refusal(where, "malformed HTTP",
                          f"malformed HTTP request from {where}: {exc_info.code} {loggable(str(exc_info.message), 120)} "
                          f"({self.count} malformed so far)")


#: The malformed-request counter of a running app (`serve` hands it to aiohttp as its logger).
MALFORMED_REQUESTS = web.AppKey("malformed_requests", MalformedRequests)
