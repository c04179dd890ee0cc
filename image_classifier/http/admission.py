"""Who gets in, and when: bearer tokens, a per-client rate limit, caps on the uploads arriving
and on the requests in work, and deadlines.

A request is counted twice in turn: while its body arrives (`start_receiving`, a larger cap, per
client too) and then while it is worked on (`enter`, the in-flight cap). So slow uploads cannot
take the slots of work in progress: they wait in their own, larger room, and leave it within the
body deadline (`body.py`).

BentoML 1.4's own `traffic` limits answer from outside every user middleware (their 429/504 bodies
could not be put in the envelope), so the service enforces its own, here, and sets BentoML's
timeout above ours as a backstop. Everything is per worker process, but the rate limit when
`REDIS_URL` is set: then it is counted in Redis, once for all workers and replicas.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import inspect
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from limits import RateLimitItem, parse_many
from limits.aio.strategies import MovingWindowRateLimiter as SharedRateLimiter
from limits.errors import StorageError
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from ..core.errors import ClassifierError, ErrorCode
from ..serving.settings import Settings
from ..serving.shared_state import CONNECTION_OPTIONS, SharedStateHealth

# Reachable without a token: probes, metrics, the API description and the (static) browser page.
OPEN_PATHS = frozenset(
    {"/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json", "/", "/ui"}
)
OPEN_PREFIXES = ("/static_content/", "/assets/", "/v2/health/")
OVERLOADED_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class AdmissionPolicy:
    """The admission part of `Settings` (its defaults are the settings' defaults)."""

    api_tokens: tuple[str, ...] = Settings.api_tokens  # empty: no authentication
    rate_limit: str = Settings.rate_limit  # `limits` notation, e.g. "20/second;500/hour"; "": off
    max_concurrency: int = Settings.max_concurrency  # in work at once; more: 503 OVERLOADED
    request_timeout_s: float = Settings.request_timeout_s  # still in work after: 504 TIMEOUT
    max_receiving: int = Settings.max_receiving  # bodies arriving at once; more: 503 OVERLOADED
    max_receiving_per_client: int = Settings.max_receiving_per_client  # more: 429 RATE_LIMITED
    max_body_memory: int = Settings.max_body_memory  # body bytes held at once; more: 503
    redis_url: str = Settings.redis_url  # empty: the rate limit is counted per worker

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionPolicy:
        return cls(
            api_tokens=settings.api_tokens,
            rate_limit=settings.rate_limit,
            max_concurrency=settings.max_concurrency,
            request_timeout_s=settings.request_timeout_s,
            max_receiving=settings.max_receiving,
            max_receiving_per_client=settings.max_receiving_per_client,
            max_body_memory=settings.max_body_memory,
            redis_url=settings.redis_url,
        )


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class Gate:
    """The checks, in the order a request meets them: token, rate, a free slot."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        # Compare digests, not tokens: equal length for every candidate, and no token kept around.
        self._token_digests = tuple(_digest(token) for token in policy.api_tokens)
        rates = parse_many(policy.rate_limit) if policy.rate_limit else []
        self._rate_limit = RateLimit(rates, policy.redis_url) if rates else None
        self.in_flight = 0
        self.starting = 0  # requests let in at their head whose handling has not begun yet
        self._slot_queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self.receiving = 0  # bodies arriving (admitted, not yet in work)
        self._responding = 0  # answers being written (work done)
        self._receiving_by_client: collections.Counter[str] = collections.Counter()
        self.body_bytes = 0  # held for the bodies of requests arriving or in work
        self.draining = False  # set on SIGTERM: finish what is in work, take nothing new
        self.cut_short = False  # set when the drain's grace is over: what is left is answered
        self._deadlines: set[asyncio.Timeout] = set()  # of the requests being handled

    @property
    def admitted(self) -> int:
        """Requests let in and not finished: what a SIGTERM drain waits for."""
        return self.in_flight + len(self._slot_queue) + self.receiving + self._responding

    @contextlib.contextmanager
    def responding(self) -> Iterator[None]:
        """Writing an answer: no work slot (a client that never reads must not keep one from
        others), but a SIGTERM drain still waits for it."""
        self._responding += 1
        try:
            yield
        finally:
            self._responding -= 1

    def authenticate(self, authorization: str | None) -> str | None:
        """The client's key for rate limiting (a digest of its token), or None when auth is off."""
        if not self._token_digests:
            return None
        scheme, _, credentials = (authorization or "").partition(" ")
        given = _digest(credentials.strip()) if scheme.lower() == "bearer" else b""
        matched = False
        for expected in self._token_digests:  # no early exit: timing does not tell which matched
            matched |= hmac.compare_digest(given, expected)
        if not matched:
            raise ClassifierError(
                ErrorCode.UNAUTHORIZED,
                "send a valid API token: 'authorization: Bearer <token>' as an HTTP header or as "
                "gRPC metadata",
            )
        return "token:" + given.hex()[:16]

    async def check_rate(self, client_key: str) -> None:
        if self._rate_limit is None:
            return
        reset_at = await self._rate_limit.hit(client_key)
        if reset_at is None:
            return
        retry_after = max(1, math.ceil(reset_at - time.time()))
        raise ClassifierError(
            ErrorCode.RATE_LIMITED,
            f"rate limit of {self.policy.rate_limit} exceeded; retry in {retry_after} s",
            retry_after_s=retry_after,
        )

    def start_receiving(self, client_key: str, body_bytes: int = 0) -> None:
        """On arrival: refuse at once (cheap, before any body is read) when draining, when the
        work slots and their queue are full, when too many bodies are arriving, in all or from
        this client, or when its body (`body_bytes`: its declared length, else the route's cap)
        would take the body memory past its budget. (While only the slots are full, `protocol.py`
        refused it earlier still.) `release_body` gives the bytes back once it is answered."""
        self.check_not_draining()
        if self._slot_queue_is_full():  # its body would be read for nothing
            raise self._overloaded()
        if self.receiving >= self.policy.max_receiving:
            raise ClassifierError(
                ErrorCode.OVERLOADED,
                f"the server is receiving its limit of {self.policy.max_receiving} uploads",
                retry_after_s=OVERLOADED_RETRY_AFTER_S,
            )
        if self._receiving_by_client[client_key] >= self.policy.max_receiving_per_client:
            raise ClassifierError(
                ErrorCode.RATE_LIMITED,
                f"this client is already sending {self.policy.max_receiving_per_client} uploads",
                retry_after_s=OVERLOADED_RETRY_AFTER_S,
            )
        if self.body_bytes and self.body_bytes + body_bytes > self.policy.max_body_memory:
            raise ClassifierError(
                ErrorCode.OVERLOADED,
                f"the server holds its limit of {self.policy.max_body_memory:,} bytes of "
                "request bodies",
                retry_after_s=OVERLOADED_RETRY_AFTER_S,
            )
        self.receiving += 1
        self._receiving_by_client[client_key] += 1
        self.body_bytes += body_bytes

    def hold_body(self, body_bytes: int) -> None:
        """A body that declared no length (a gRPC message), counted once in, until released."""
        self.body_bytes += body_bytes

    def release_body(self, body_bytes: int) -> None:
        self.body_bytes -= body_bytes

    @contextlib.contextmanager
    def cut_short_at_shutdown(self, deadline: asyncio.Timeout) -> Iterator[None]:
        """A request's deadline, brought to now when the drain's grace is over (`cut_in_work`)."""
        self._deadlines.add(deadline)
        try:
            yield
        finally:
            self._deadlines.discard(deadline)

    def cut_in_work(self) -> None:
        """SHUTDOWN_GRACE_S is over: the requests still in work are answered SHUTTING_DOWN now
        (their clients retry on another replica), so the process exits within the grace the
        operator gave it and Kubernetes' termination grace period, not at REQUEST_TIMEOUT_S."""
        self.cut_short = True
        now = asyncio.get_running_loop().time()
        for deadline in self._deadlines:
            deadline.reschedule(now)

    def shutdown_cut(self) -> ClassifierError:
        return ClassifierError(
            ErrorCode.SHUTTING_DOWN,
            "this server shut down before the request was done (its SHUTDOWN_GRACE_S was over); "
            "retry on another replica",
            retry_after_s=OVERLOADED_RETRY_AFTER_S,
        )

    def check_not_draining(self) -> None:
        """New work is refused once SIGTERM came: the client retries on another replica."""
        if self.draining:
            raise self._shutting_down()

    def capacity_refusal(self) -> ClassifierError | None:
        """Why new work would be refused now (draining, or every work slot taken), else None:
        cheap enough to ask before anything of a request but its head is read.

        The requests let in whose handling has not begun count as taken slots: a busy event loop
        parses many heads before it runs any of their handlers, and without them the heads of a
        whole burst would pass here, to be refused later at the full cost of the middlewares."""
        if self.draining:
            return self._shutting_down()
        if self.in_flight + self.starting >= self.policy.max_concurrency:
            return self._overloaded()
        return None

    def stop_receiving(self, client_key: str) -> None:
        self.receiving -= 1
        self._receiving_by_client[client_key] -= 1
        if not self._receiving_by_client[client_key]:
            del self._receiving_by_client[client_key]

    async def enter(self) -> None:
        """Take a work slot once the body is in. Every slot taken: wait for one in a FIFO queue
        as long as the cap, and only when that is full too, refuse (a fast honest 503 beats a
        queue that times out). New arrivals are refused at their head while the slots are full
        (`protocol.py`), so the queue holds only requests that were let in in the same instant
        as the last slot was taken: refusing those after their body has been read would throw
        that work away. Not refused for draining: the request was admitted before the SIGTERM."""
        if self.in_flight < self.policy.max_concurrency and not self._slot_queue:
            self.in_flight += 1
            return
        if self._slot_queue_is_full():
            raise self._overloaded()
        turn = asyncio.get_running_loop().create_future()
        self._slot_queue.append(turn)
        try:
            await turn  # `leave` hands its slot over
        except BaseException:  # the deadline, or the client left
            if turn.done() and not turn.cancelled():
                self.leave()  # the slot came with the cancellation: pass it on
            elif turn in self._slot_queue:  # `leave` drops a cancelled turn it meets first
                self._slot_queue.remove(turn)
            raise

    def leave(self) -> None:
        while self._slot_queue:
            turn = self._slot_queue.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes to the next in the queue
                return
        self.in_flight -= 1

    def _slot_queue_is_full(self) -> bool:
        return len(self._slot_queue) >= self.policy.max_concurrency

    def _overloaded(self) -> ClassifierError:
        return ClassifierError(
            ErrorCode.OVERLOADED,
            f"the server is at its limit of {self.policy.max_concurrency} requests in work",
            retry_after_s=OVERLOADED_RETRY_AFTER_S,
        )

    @staticmethod
    def _shutting_down() -> ClassifierError:
        return ClassifierError(
            ErrorCode.SHUTTING_DOWN,
            "this server is shutting down; retry on another replica",
            retry_after_s=OVERLOADED_RETRY_AFTER_S,
        )


class RateLimit:
    """One `RATE_LIMIT` for each client, counted in Redis when it is given, else in this worker.
    It may be several limits (`20/second;500/hour`): a request must pass each.

    Redis down: it fails open to this worker's own count of the same limit (logged once, counted
    in image_classifier_shared_state_errors_total{part="rate_limit"}). A client then gets at most
    the limit from each worker, instead of every request refused (fail closed: an outage of the
    whole service for an outage of an optimisation) or none limited (fail wide open)."""

    def __init__(self, rates: RateLimitItem | Sequence[RateLimitItem], redis_url: str = "") -> None:
        self.rates = (rates,) if isinstance(rates, RateLimitItem) else tuple(rates)
        self._local = MovingWindowRateLimiter(MemoryStorage())
        self._shared = None
        if redis_url:
            storage = storage_from_string(
                "async+" + redis_url,
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix="image_classifier:rate",
                **CONNECTION_OPTIONS,
            )
            self._shared = SharedRateLimiter(storage)
        self.health = SharedStateHealth("rate_limit")

    async def hit(self, client_key: str) -> float | None:
        """Count one request: None when it is let in, else when the client may come back."""
        if self._shared is not None and self.health.usable():
            try:
                reset_at = await self._count(self._shared, client_key)
            except (StorageError, OSError) as error:
                self.health.failed(error, "limiting in each worker on its own")
            else:
                self.health.succeeded()
                return reset_at
        return await self._count(self._local, client_key)

    async def _count(
        self, limiter: MovingWindowRateLimiter | SharedRateLimiter, client_key: str
    ) -> float | None:
        """Count the request in every limit, or in none: the others are tested before the last
        counts it, so a request one limit refuses does not use up the others' budget."""
        *others, last = self.rates
        for rate in others:
            if not await _settled(limiter.test(rate, client_key)):
                return await self._reset_at(limiter, rate, client_key)
        if not await _settled(limiter.hit(last, client_key)):
            return await self._reset_at(limiter, last, client_key)
        for rate in others:  # tested above; a request racing this one may make it one too many
            await _settled(limiter.hit(rate, client_key))
        return None

    @staticmethod
    async def _reset_at(
        limiter: MovingWindowRateLimiter | SharedRateLimiter, rate: RateLimitItem, client_key: str
    ) -> float:
        return (await _settled(limiter.get_window_stats(rate, client_key))).reset_time


async def _settled(result: object) -> object:
    """The answer of this worker's limiter (plain) and of the shared one (awaitable) alike."""
    return await result if inspect.isawaitable(result) else result


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()
