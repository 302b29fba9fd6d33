"""The data scientist's client: join the mesh, list a node's datasets, send a plan, wait, verify, get the model.

Two faces:

* :class:`Client` -- the async (trio) API: ``async with Client.connect(addr) as c: ...``
* :class:`BlockingClient` -- the same calls from plain code or a Jupyter notebook. It runs trio in a thread of its own,
  so it works under a notebook's asyncio loop.

A result is handed over only after :func:`~hivecell.crypto.signoff.verify_signoff` accepted its sign-off: signed by the
dataset's advertised owner key (or by the node within the owner's delegation, which the advert carries), for this job,
this plan, this scientist, this dataset and exactly the bytes received.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from hivecell.crypto.canonical import CanonicalError, strict_unpackb
from hivecell.crypto.identity import Identity
from hivecell.crypto.record import InvalidRecord, seal
from hivecell.crypto.signoff import SignOff, SignoffRejected, verify_signoff
from hivecell.mesh.blob import SharedOffers, fetch_blob
from hivecell.mesh.dht import MeshDht
from hivecell.mesh.discovery import Discovery
from hivecell.mesh.gossip import INDEX_PROTOCOL, GossipConfig, GossipIndex, IndexHits, IndexSearch, open_gossip
from hivecell.mesh.host import MeshHost, PeerUnreachable, RemoteError, open_host
from hivecell.mesh.index import AdvertIndex
from hivecell.mesh.lane import Lane, LaneConfig, LaneError, lane_listen_host, open_lane
from hivecell.mesh.mdns import resolve_interfaces
from hivecell.mesh.message import ErrorCode, RemoteProtocolError

from .dataset import DatasetInfo, open_advert
from .job import TERMINAL, JobState
from .wire import (
    DATASET_PROTOCOL, JOB_DOMAIN, JOB_PROTOCOL, MAX_WATCH_S, DatasetList, FetchResult, JobAccepted, JobResultMsg, JobStatus,
    ListDatasets, SubmitJob, WatchJob,
)

__all__ = ["Client", "BlockingClient", "JobResult", "JobFailed", "ResultRejected", "RemoteError", "PeerUnreachable"]

logger = logging.getLogger(__name__)
JOB_REQUEST_TTL_S = 300
LANE_THRESHOLD = 1 << 20  # weights above this many bytes go by reference, pulled by the node over the bulk lane
RESULT_PULL_S = 300.0  # pulling a result by reference from a node may take this long


@asynccontextmanager
async def _maybe_lane(host: MeshHost, enabled: bool, listen: Sequence[str]) -> AsyncIterator[Lane | None]:
    if not enabled:
        yield None
        return
    async with open_lane(host, LaneConfig(listen_host=lane_listen_host(listen))) as lane:
        yield lane


class JobFailed(Exception):
    """The job ended without a released result (failed, or withheld by the data owner)."""

    def __init__(self, job_id: str, state: str, reason: str) -> None:
        super().__init__(f"job {job_id} {state}: {reason}")
        self.job_id, self.state, self.reason = job_id, state, reason


class ResultRejected(Exception):
    """The node returned a result whose sign-off does not verify; it was discarded."""


@dataclass(frozen=True)
class JobResult:
    """A released, verified result."""

    job_id: str
    weights: bytes  # safetensors, same names as the model's state_dict; b"" for an evaluate job (metrics only)
    metrics: dict[str, Any]
    signoff: SignOff
    signoff_record: bytes
    result_hash: str
    timings: dict[str, Any] = field(default_factory=dict)  # the node's own account of the job (not signed)
    # a recipe with ``update`` (fp16/bf16/int8, named in the weights' metadata): ``weights`` is the change from the
    # weights the job was sent, which Client.train keeps here so that state_dict() and apply_to() give the trained ones
    sent_weights: bytes = b""

    def state_dict(self) -> dict[str, Any]:
        """The trained weights as torch tensors (imports torch).

        Raises:
            ValueError: the job released no weights (an evaluate job).
        """
        from .plan import load_weights

        return load_weights(self._trained_weights())

    def apply_to(self, model: Any) -> Any:
        """Load the trained weights into ``model`` (the module the plan was built from) and return it.

        Raises:
            ValueError: the job released no weights (an evaluate job).
        """
        from .plan import apply_weights

        apply_weights(model, self._trained_weights())
        return model

    def _trained_weights(self) -> bytes:
        if not self.weights:
            raise ValueError(f"job {self.job_id} released no weights: an evaluate job returns metrics only")
        from .plan import update_encoding

        encoding = update_encoding(self.weights)
        if encoding == "full":
            return self.weights
        if not self.sent_weights:
            raise ValueError(f"job {self.job_id} returned an {encoding} update: rebuild the weights with "
                             f"hivecell.node.plan.apply_update(plan.weights, result.weights, {encoding!r})")
        from .plan import apply_update

        return apply_update(self.sent_weights, self.weights, encoding)


class Client:
    """A scientist's connection to the mesh and to one node of it.

    Create with :meth:`connect` (one node, by address) or :meth:`join` (find the mesh: mDNS, bootstrap addresses;
    then :meth:`search` it and pick a node with :meth:`to`).
    """

    def __init__(self, host: MeshHost, node: str, address: str, *, discovery: Discovery | None = None,
                 gossip: GossipIndex | None = None, dht: MeshDht | None = None, offers: SharedOffers | None = None,
                 lane_threshold: int = LANE_THRESHOLD) -> None:
        self.host, self.node, self.address = host, node, address
        self.discovery, self.gossip, self.dht = discovery, gossip, dht
        # the bulk lane (hivecell.mesh.lane): weights above lane_threshold are offered on it and pulled by the node,
        # and results above the node's threshold are pulled from the node's; None: everything inline
        self.offers, self.lane_threshold = offers, lane_threshold
        self._datasets: dict[str, DatasetInfo] = {}
        self._plans: dict[str, tuple[str, str]] = {}  # job id -> (dataset, plan hash)

    @classmethod
    @asynccontextmanager
    async def join(cls, *, identity: Identity | None = None, bootstrap: Sequence[str] = (), mdns: bool = True,
                   mdns_interfaces: Sequence[str] | None = None, index: bool = False, dht: bool = True,
                   listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",), lane: bool = True) -> AsyncIterator[Client]:
        """Join the mesh with no node in mind: browse mDNS on ``mdns_interfaces`` (default: every non-loopback
        interface; nothing is announced) and dial ``bootstrap`` addresses. With ``index``, keep an index of adverts
        in this process too (it fills by anti-entropy from the peers found, and :meth:`search` also reads it). With
        ``dht``, a search by tag also asks the DHT which nodes provide the tag (for datasets no index peer reaches).
        With ``lane``, large weights and results travel on a bulk lane (TLS 1.3 bound to the peer ids) listening on
        the host of the first ``listen`` address; a node that cannot reach it pulls over the libp2p stream instead.

        Raises:
            MdnsError: an interface name that does not exist here.
        """
        ips = resolve_interfaces(list(mdns_interfaces) if mdns_interfaces is not None else None) if mdns else []
        async with open_host(identity or Identity.generate(), list(listen)) as host, \
                _maybe_lane(host, lane, listen) as bulk:
            async with trio.open_nursery() as nursery:
                discovery = Discovery(host, mdns_ips=ips, announce=False, bootstrap=list(bootstrap))
                await nursery.start(discovery.serve)
                gossip = await open_gossip(host, AdvertIndex(), GossipConfig(index=True), nursery) if index else None
                mesh_dht = MeshDht(host, server=False) if dht else None
                if mesh_dht is not None:
                    await nursery.start(mesh_dht.serve)
                yield cls(host, "", "", discovery=discovery, gossip=gossip, dht=mesh_dht,
                          offers=SharedOffers(bulk) if bulk is not None else None)
                nursery.cancel_scope.cancel()

    def to(self, node: str | DatasetInfo) -> Client:
        """A client for ``node`` (a peer id, or the node of a search result) on the same host: submit jobs to it."""
        info = node if isinstance(node, DatasetInfo) else None
        peer = info.node if info is not None else str(node)
        client = Client(self.host, peer, info.address if info is not None else "", discovery=self.discovery,
                        gossip=self.gossip, dht=self.dht, offers=self.offers, lane_threshold=self.lane_threshold)
        if info is not None:
            client._datasets[info.name] = info
        return client

    async def _ensure_connected(self) -> None:
        if self.node in self.host.connected_peers():
            return
        addrs = [self.address] if self.address else []
        if self.discovery is not None and self.node in self.discovery.peers:
            addrs += self.discovery.peers[self.node].addrs
        addrs += [a for info in self._datasets.values() for a in info.addrs]
        for addr in dict.fromkeys(a for a in addrs if a.endswith("/p2p/" + self.node)):
            try:
                await self.host.connect(addr)
                return
            except (PeerUnreachable, ValueError):
                continue

    def peers(self) -> list[dict[str, Any]]:
        """Known peers and how they were found (empty for a client made with :meth:`connect`)."""
        return self.discovery.snapshot() if self.discovery is not None else []

    async def search(self, words: Sequence[str] = (), *, tags: Sequence[str] = (), fields: Sequence[str] = (),
                     timeout: float = 5.0, expect: int | None = None, limit: int = 100) -> list[DatasetInfo]:
        """Datasets on the mesh whose advert has every word (name, description, tags), tag and schema field.

        Asks the index peers among the connected peers (several at once, again as discovery finds more) and, if
        none answers, each connected node for its own datasets. Every advert is verified here; an index peer is only
        trusted to find records. Returns within ``timeout`` seconds, or once ``expect`` datasets were found, or once
        the answers stop bringing anything new; sorted by name, then node.
        """
        found = AdvertIndex(max_per_signer=1024, max_total=100_000)
        not_index: set[str] = set()  # peers that do not answer index searches: asked for their own datasets
        asked: set[str] = set()
        query = IndexSearch(words=list(words), tags=list(tags), fields=list(fields), limit=limit)

        def results() -> list[DatasetInfo]:
            out = []
            for advert in found.search(words, tags=tags, fields=fields, limit=limit):
                try:
                    out.append(open_advert(advert.raw))
                except InvalidRecord as exc:
                    logger.debug("search: skipping an advert of %s: %s", advert.signer[-8:], exc.reason)
            return out

        async def ask(peer: str) -> None:
            if peer not in not_index:
                try:
                    hits = await self.host.request(peer, INDEX_PROTOCOL, query, expect=IndexHits, timeout=5.0)
                except (PeerUnreachable, RemoteError, RemoteProtocolError) as exc:
                    logger.debug("search: %s answered no index search: %s", peer[-8:], exc)
                    not_index.add(peer)
                else:
                    for raw in hits.adverts[:limit]:
                        found.offer(raw)
                    return
            try:  # a node without the index role (or an older one): its own datasets
                reply = await self.host.request(peer, DATASET_PROTOCOL, ListDatasets(), expect=DatasetList,
                                                timeout=5.0)
            except (PeerUnreachable, RemoteError, RemoteProtocolError):
                return
            for raw in reply.adverts[:1024]:
                found.offer(raw)

        async def ask_dht() -> None:
            """Nodes that provide one of the tags: dial them; the next round asks them for their datasets."""
            for tag in tags:
                for peer, addrs in await self.dht.providers(tag):  # type: ignore[union-attr]
                    if self.discovery is not None:
                        await self.discovery.found(peer, addrs, "dht")
                    elif peer not in self.host.connected_peers():
                        for addr in addrs:
                            try:
                                await self.host.connect(addr)
                                break
                            except (PeerUnreachable, ValueError):
                                continue

        quiet_since: float | None = None
        dht_asked_at = -math.inf
        with trio.move_on_after(timeout):
            if self.discovery is not None:
                await self.discovery.connected_event.wait()
            while True:
                before = found.digest()
                if self.gossip is not None:
                    for advert in self.gossip.index.search(words, tags=tags, fields=fields, limit=limit):
                        found.offer(advert.raw)
                connected = set(self.host.connected_peers())
                # Waiting for a number of results: ask everyone again (nodes may still be publishing); otherwise
                # only peers not asked yet.
                targets = connected if expect is not None else connected - asked
                async with trio.open_nursery() as nursery:
                    for peer in targets:
                        nursery.start_soon(ask, peer)
                    # The DHT once the first answers are in, and again every few seconds while results are missing.
                    if (self.dht is not None and tags and connected
                            and trio.current_time() - dht_asked_at >= 2.0 and (expect is None or dht_asked_at < 0
                                                                              or len(results()) < expect)):
                        dht_asked_at = trio.current_time()
                        nursery.start_soon(ask_dht)
                asked |= targets
                if expect is not None:
                    if len(results()) >= expect:
                        break
                elif found.digest() != before or quiet_since is None:
                    quiet_since = trio.current_time() if asked else None
                elif trio.current_time() - quiet_since >= 1.0:
                    break  # a second with nothing new from the peers found so far
                await trio.sleep(0.25 if expect is None else 0.5)
        return results()

    @classmethod
    @asynccontextmanager
    async def connect(cls, address: str, *, identity: Identity | None = None, lane: bool = True
                      ) -> AsyncIterator[Client]:
        """Join the mesh with ``identity`` (default: a fresh ephemeral one) and dial the node at ``address``; with
        ``lane``, large weights and results travel on a bulk lane (see :meth:`join`).

        Raises:
            ValueError: ``address`` is not a ``/ip4/.../tcp/.../p2p/<peer id>`` multiaddr.
            PeerUnreachable: the node cannot be reached.
        """
        listen = ["/ip4/127.0.0.1/tcp/0"]
        async with open_host(identity or Identity.generate(), listen) as host, _maybe_lane(host, lane, listen) as bulk:
            node = await host.connect(address)
            yield cls(host, node, address, offers=SharedOffers(bulk) if bulk is not None else None)

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    async def datasets(self) -> list[DatasetInfo]:
        """The node's datasets, from adverts whose signature verifies (others are skipped and logged)."""
        await self._ensure_connected()
        reply = await self.host.request(self.node, DATASET_PROTOCOL, ListDatasets(), expect=DatasetList)
        out = []
        for raw in reply.adverts:
            try:
                info = open_advert(raw)
            except InvalidRecord as exc:
                logger.warning("skipping an advert from %s: %s", self.node[-8:], exc.reason)
                continue
            if info.node != self.node:
                logger.warning("skipping an advert signed by %s, not by the node", info.node[-8:])
                continue
            out.append(info)
        self._datasets = {d.name: d for d in out}
        return out

    @asynccontextmanager
    async def _request(self, dataset: str, plan: Any, wait_s: float = 0.0) -> AsyncIterator[tuple[str, SubmitJob]]:
        """A signed job request for ``plan``; weights above ``lane_threshold`` go by reference and stay offered to the
        node (on the lane) while the block runs: the node pulls them before it accepts the job."""
        job_id = uuid.uuid4().hex
        request = seal(self.host.identity, JOB_DOMAIN, {
            "job_id": job_id, "node": self.node, "dataset": dataset, "plan_hash": plan.hash, "recipe": plan.recipe,
        }, ttl=JOB_REQUEST_TTL_S, with_nonce=True)
        lane = self.offers is not None
        if not lane or len(plan.weights) <= self.lane_threshold:
            yield job_id, SubmitJob(request=request, program=plan.program, weights=plan.weights, wait_s=wait_s,
                                    lane=lane)
            return
        assert self.offers is not None
        async with self.offers.holding(plan.weights, self.node, sha256=plan.weights_sha256) as ref:
            yield job_id, SubmitJob(request=request, program=plan.program, weights=b"", weights_ref=ref,
                                    weights_size=len(plan.weights), wait_s=wait_s, lane=True)

    async def _result_bytes(self, reply: JobResultMsg) -> bytes:
        """The result's bytes: inline, or pulled from the node's lane by reference (checked against the reference;
        the sign-off check that follows binds them to the job)."""
        if not reply.result_ref:
            return reply.result
        if self.offers is None:
            raise RemoteError(ErrorCode.BAD_MESSAGE, "the node sent a result by reference to a client without a lane")
        try:
            blob = await fetch_blob(self.offers.lane, self.node, reply.result_ref, timeout=RESULT_PULL_S)
        except LaneError as exc:
            raise PeerUnreachable(f"could not pull the result of job {reply.job_id} from the node: {exc}") from exc
        if len(blob) != reply.result_size:
            raise ResultRejected(f"result of job {reply.job_id} refused: its size is not the one announced")
        return bytes(blob)

    def _accepted(self, job_id: str, reply: object, dataset: str, plan: Any) -> None:
        if not isinstance(reply, JobAccepted):
            raise RemoteError(ErrorCode.BAD_MESSAGE, "the node did not answer a job request with its acceptance")
        if reply.job_id != job_id:
            raise RemoteError(ErrorCode.BAD_MESSAGE, "the node accepted another job than the one sent")
        self._plans[job_id] = (dataset, plan.hash)

    async def submit(self, dataset: str, plan: Any) -> str:
        """Send ``plan`` (from :func:`hivecell.node.plan.build_plan`) to run on ``dataset``; return the job id.

        Raises:
            RemoteError: the node refused the job (``.code`` says why: unknown_dataset, bad_recipe, bad_plan, ...).
        """
        await self._ensure_connected()
        async with self._request(dataset, plan) as (job_id, message):
            reply = await self.host.request(self.node, JOB_PROTOCOL, message, expect=JobAccepted,
                                            timeout=_submit_timeout(message))
        self._accepted(job_id, reply, dataset, plan)
        return job_id

    async def submit_and_fetch(self, dataset: str, plan: Any, *, wait_s: float = MAX_WATCH_S
                               ) -> tuple[str, JobResult | None]:
        """Submit, then on the same stream wait up to ``wait_s`` for the verified result: one stream per job, as a
        FedAvg round wants. Returns ``(job_id, result)``; ``result`` is ``None`` if the job had not ended by then or
        the stream ended before the second answer (the node may predate it): go on with :meth:`result`.

        Raises:
            RemoteError: the node refused the job (as :meth:`submit`).
            JobFailed: the job failed or its owner withheld the result.
            ResultRejected: the result's sign-off does not verify.
        """
        await self._ensure_connected()
        async with self._request(dataset, plan, wait_s=wait_s) as (job_id, message), \
                self.host.conversation(self.node, JOB_PROTOCOL, message) as replies:
            self._accepted(job_id, await replies.receive(timeout=_submit_timeout(message)), dataset, plan)
            try:
                reply = await replies.receive(timeout=min(wait_s, MAX_WATCH_S) + 120.0)
            except RemoteError as exc:
                if exc.code == ErrorCode.JOB_FAILED:
                    raise JobFailed(job_id, JobState.FAILED.value, exc.message) from None
                if exc.code == ErrorCode.WITHHELD:
                    raise JobFailed(job_id, JobState.WITHHELD.value, exc.message) from None
                if exc.code == ErrorCode.NOT_READY:
                    return job_id, None
                raise
            except PeerUnreachable:  # the stream broke after the acceptance: the job is the node's; ask again
                return job_id, None
        if reply is None:
            return job_id, None
        if not isinstance(reply, JobResultMsg):
            raise RemoteError(ErrorCode.BAD_MESSAGE, "the node answered a job request with neither a result nor why")
        if reply.job_id != job_id:
            raise RemoteError(ErrorCode.BAD_MESSAGE, "the node answered about another job")
        if dataset not in self._datasets:
            await self.datasets()  # the owner to check the sign-off against comes from the signed advert
        try:
            result = await self._result_bytes(reply)
        except PeerUnreachable:  # the job is released on the node: FetchResult can get it again
            logger.warning("job %s: pulling its result failed; fetch it with result()", job_id)
            return job_id, None
        return job_id, replace(self.verify(job_id, result, reply.signoff), timings=dict(reply.timings))

    async def status(self, job_id: str, *, since: int = 0, wait_s: float = 0.0, until_done: bool = False
                     ) -> JobStatus:
        """The job's status now; with ``wait_s``, once its seq is above ``since`` (or, with ``until_done``, once it
        is released, withheld or failed), or after ``wait_s`` seconds, whichever comes first."""
        reply = await self.host.request(self.node, JOB_PROTOCOL,
                                        WatchJob(job_id=job_id, since=since, wait_s=wait_s, until_done=until_done),
                                        expect=JobStatus, timeout=wait_s + 30.0)
        if reply.job_id != job_id:
            raise RemoteError(ErrorCode.BAD_MESSAGE, "the node answered about another job")
        return reply

    async def wait(self, job_id: str, *, timeout: float | None = None,
                   on_progress: Callable[[JobStatus], None] | None = None) -> JobStatus:
        """Wait until the job is released, withheld or failed; call ``on_progress`` on every change.

        Raises:
            trio.TooSlowError: not finished within ``timeout``.
        """
        with trio.fail_after(math.inf if timeout is None else timeout):
            if on_progress is None:  # the node answers once, when the job is done: one request per job, not one
                while True:          # per progress frame (a FedAvg round waits on many nodes this way)
                    status = await self.status(job_id, wait_s=MAX_WATCH_S, until_done=True)
                    if JobState(status.state) in TERMINAL:
                        return status
            status = await self.status(job_id)
            on_progress(status)
            while JobState(status.state) not in TERMINAL:
                nxt = await self.status(job_id, since=status.seq, wait_s=MAX_WATCH_S)
                if nxt.seq != status.seq:
                    on_progress(nxt)
                status = nxt
            return status

    async def result(self, job_id: str, *, dataset: str | None = None, plan_hash: str | None = None,
                     wait_s: float = 0.0) -> JobResult:
        """Fetch and verify a released result; with ``wait_s``, the node first waits up to that long (at most
        ``MAX_WATCH_S``) for the job to end, so a caller that wants no progress needs one request per job.

        A job submitted by this client is checked against the dataset and plan it was sent with; for a job submitted
        in an earlier session (same identity), pass ``dataset`` and ``plan_hash`` to have them checked too.

        Raises:
            RemoteError: not released (``not_ready``: still queued, running or awaiting sign-off after ``wait_s``;
                ``withheld``; ``job_failed``).
            ResultRejected: the sign-off does not verify; the result is discarded.
        """
        reply = await self.host.request(self.node, JOB_PROTOCOL,
                                        FetchResult(job_id=job_id, wait_s=wait_s, lane=self.offers is not None),
                                        expect=JobResultMsg, timeout=min(wait_s, MAX_WATCH_S) + 120.0)
        if reply.job_id != job_id:
            raise RemoteError(ErrorCode.BAD_MESSAGE, "the node answered about another job")
        if job_id not in self._plans and dataset is not None and plan_hash is not None:
            self._plans[job_id] = (dataset, plan_hash)
        if job_id in self._plans and self._plans[job_id][0] not in self._datasets:
            await self.datasets()  # the owner to check the sign-off against comes from the signed advert
        result = await self._result_bytes(reply)
        return replace(self.verify(job_id, result, reply.signoff), timings=dict(reply.timings))

    def verify(self, job_id: str, result: bytes, signoff: bytes) -> JobResult:
        """Check a result against its sign-off and what this client asked; return it decoded.

        Raises:
            ResultRejected: wrong signer, wrong job/plan/scientist/dataset, result bytes that are not the signed ones,
                or a result that does not decode.
        """
        if job_id not in self._plans:
            raise ResultRejected(f"job {job_id} was not submitted by this client; pass dataset= and plan_hash= to "
                                 f"result() so the sign-off can be checked against them")
        dataset, p_hash = self._plans[job_id]
        advert = self._datasets.get(dataset)
        if advert is None:
            raise ResultRejected(f"no verified advert for dataset {dataset!r}: its owner is unknown")
        result_hash = hashlib.sha256(result).hexdigest()
        try:
            statement, _ = verify_signoff(signoff, owner=advert.owner, job_id=job_id, result_hash=result_hash,
                                          plan_hash=p_hash, scientist=self.peer_id, dataset=dataset,
                                          delegation=advert.delegation)
        except SignoffRejected as exc:
            raise ResultRejected(f"result of job {job_id} refused: {exc.reason}") from exc
        if statement.node != self.node:
            raise ResultRejected(f"result of job {job_id} refused: signed off for another node")
        if advert.signoff == "manual" and statement.decision != "owner":
            raise ResultRejected(f"result of job {job_id} refused: the dataset needs the owner's own sign-off")
        try:
            body = strict_unpackb(result, max_len=len(result))
            weights, metrics = body["weights"], body["metrics"]
            if not isinstance(weights, bytes) or not isinstance(metrics, dict):
                raise TypeError
        except (CanonicalError, KeyError, TypeError) as exc:
            raise ResultRejected(f"result of job {job_id} is malformed") from exc
        return JobResult(job_id=job_id, weights=weights, metrics=metrics, signoff=statement, signoff_record=signoff,
                         result_hash=result_hash)

    async def train(self, dataset: str, plan: Any, *, timeout: float | None = None,
                    on_progress: Callable[[JobStatus], None] | None = None) -> JobResult:
        """Submit, wait, verify: the whole data-centric round trip.

        Raises:
            JobFailed: the job failed or the owner withheld the result. Plus what submit/result raise.
        """
        job_id = await self.submit(dataset, plan)
        status = await self.wait(job_id, timeout=timeout, on_progress=on_progress)
        if status.state != JobState.RELEASED.value:
            raise JobFailed(job_id, status.state, status.reason)
        result = await self.result(job_id)
        if result.weights and plan.recipe.get("update", "full") != "full":
            result = replace(result, sent_weights=plan.weights)
        return result


def _submit_timeout(message: SubmitJob) -> float:
    """How long a node may take to accept a job: longer when it first pulls the weights (at 20 MB/s, the libp2p
    stream's pace on a slow box)."""
    return 120.0 + (message.weights_size / 20e6 if message.weights_ref else 0.0)


class BlockingClient:
    """:class:`Client` for code without an event loop of its own (scripts, notebooks).

    ``client = BlockingClient("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...")``; call the same methods without ``await``;
    ``client.close()`` (or use it as a context manager) when done.
    """

    def __init__(self, address: str, *, identity: Identity | None = None, connect_timeout: float = 30.0) -> None:
        self._calls: queue.Queue[Any] = queue.Queue()
        ready: queue.Queue[Any] = queue.Queue()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._client: Client | None = None

        async def main() -> None:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            try:
                async with Client.connect(address, identity=identity) as client:
                    self._client = client
                    ready.put(None)
                    await self._stop.wait()
            except BaseException as exc:  # hand connect errors to the caller's thread
                ready.put(exc)
                if not isinstance(exc, Exception):
                    raise

        self._thread = threading.Thread(target=trio.run, args=(main,), name="hivecell-client", daemon=True)
        self._thread.start()
        try:
            err = ready.get(timeout=connect_timeout)
        except queue.Empty:
            raise PeerUnreachable(f"could not connect to {address} within {connect_timeout} s") from None
        if err is not None:
            raise err

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._client is None or self._token is None:
            raise RuntimeError("the client is closed")
        fn = getattr(self._client, name)
        return trio.from_thread.run(lambda: fn(*args, **kwargs), trio_token=self._token)

    @property
    def peer_id(self) -> str:
        assert self._client is not None
        return self._client.peer_id

    def datasets(self) -> list[DatasetInfo]:
        return self._call("datasets")

    def submit(self, dataset: str, plan: Any) -> str:
        return self._call("submit", dataset, plan)

    def status(self, job_id: str) -> JobStatus:
        return self._call("status", job_id)

    def wait(self, job_id: str, *, timeout: float | None = None,
             on_progress: Callable[[JobStatus], None] | None = None) -> JobStatus:
        return self._call("wait", job_id, timeout=timeout, on_progress=on_progress)

    def result(self, job_id: str, *, dataset: str | None = None, plan_hash: str | None = None) -> JobResult:
        return self._call("result", job_id, dataset=dataset, plan_hash=plan_hash)

    def train(self, dataset: str, plan: Any, *, timeout: float | None = None,
              on_progress: Callable[[JobStatus], None] | None = None) -> JobResult:
        return self._call("train", dataset, plan, timeout=timeout, on_progress=on_progress)

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(timeout=10)
        self._client = None

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


