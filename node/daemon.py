"""The node daemon: serves dataset adverts and jobs to peers, runs jobs in Worker subprocesses, signs off results.

The daemon never imports torch: plans are audited as JSON and safetensors headers here, and only the Worker (a fresh
interpreter per job) loads them. Everything a peer sends is size-capped by the framing layer, decoded strictly into a
typed message, and checked here in this order: signature, signer = connection peer, freshness, target node, replay
(nonce), dataset, recipe, plan audit, plan hash. Peers get error codes; details go to the local log.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import trio


from hivecell.crypto.identity import Identity
from hivecell.crypto.record import InvalidRecord, open_record
from hivecell.mesh.blob import BlobCache, SharedOffers, fetch_blob
from hivecell.mesh.errors import leaves
from hivecell.mesh.dht import MeshDht
from hivecell.mesh.discovery import Discovery
from hivecell.mesh.gossip import GossipConfig, open_gossip
from hivecell.mesh.host import RemoteError, Reply, open_host, short
from hivecell.mesh.index import AdvertIndex
from hivecell.mesh.lane import BlobTooLarge, BlobUnavailable, Lane, LaneConfig, LaneError, lane_listen_host, open_lane
from hivecell.mesh.mdns import announce_addrs, resolve_interfaces
from hivecell.mesh.message import ErrorCode, Message

from . import job as jobsm
from .advertiser import Advertiser, load_index
from .dataset import ADVERT_TTL_S, DatasetError, check_name, make_advert
from .home import Home
from .owner import load_owner
from .plan import PlanError, audit_program, audit_weights, plan_hash_of, validate_recipe
from .privacy import price_job
from .ledger import LedgerError
from .release import complete_job, fail_entry, plan_blobs, reserve_entry
from .store import QueueFull, Store, StoreError, sha256_hex
from .wire import (
    DATASET_PROTOCOL, JOB_DOMAIN, JOB_PROTOCOL, MAX_BLOB_REF_BYTES, MAX_WATCH_S, DatasetList, FetchResult, JobAccepted,
    JobResultMsg, JobStatus, ListDatasets, SubmitJob, WatchJob,
)
from .workerpool import WorkerFailed, WorkerJob, WorkerLimits, open_worker_pool

__all__ = ["DaemonConfig", "Daemon", "serve_daemon", "recover_jobs", "JOB_REQUEST_MAX_TTL_S"]

logger = logging.getLogger(__name__)

LANE_THRESHOLD = 1 << 20  # weights and results above this many bytes go over the bulk lane, when the peer has one
RESULT_OFFER_S = 120.0  # a result sent by reference stays offered this long for the scientist to pull
WEIGHTS_FETCH_S = 300.0  # pulling a plan's weights from the scientist may take this long
JOB_REQUEST_MAX_TTL_S = 600  # a signed job request is good for at most 10 minutes; its nonce is kept at least that long
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    warm_workers: int = 1
    worker_fork: bool = True  # fork Workers from a zygote that imported torch once (with warm_workers > 0)
    max_concurrent_jobs: int = 1
    worker_wall_s: float = 3600.0
    worker_memory_mb: int = 4096
    worker_threads: int | None = None
    max_attempts: int = jobsm.MAX_ATTEMPTS
    max_queued: int = 256  # jobs waiting on this node, from everyone
    max_queued_per_peer: int = 16  # jobs waiting from one scientist
    mdns: bool = True  # LAN discovery (announce and browse) on mdns_interfaces
    mdns_interfaces: list[str] | None = None  # names or IPv4 addresses; None: every non-loopback interface
    bootstrap: list[str] = field(default_factory=list)  # peers to dial at start (and again while not connected)
    index: bool = True  # keep the gossip index and answer searches
    advert_ttl: float = ADVERT_TTL_S
    lane: bool = True  # a TLS listener for bulk transfers (off: blobs by reference go over libp2p streams)
    lane_port: int = 0  # its TCP port (0: any free one)
    lane_threshold: int = LANE_THRESHOLD  # results above this go by reference to a scientist that pulls blobs
    gpu: str = "auto"  # where the Worker trains: auto (CUDA when torch sees it), on (required), off (CPU)


def _status(job: dict[str, Any]) -> JobStatus:
    progress = job.get("progress", {})
    dp = math.isfinite(job.get("epsilon", math.inf))
    if dp or (job.get("policy") != "auto" and job["state"] != jobsm.JobState.RELEASED.value):
        # The loss is computed by the scientist's model on private data: a value per epoch that the owner has not
        # signed off (until release), and that DP-SGD's noise never covers. So the scientist sees how far the job is,
        # not what it learnt, while the result waits for the owner, and always for a job that promises an epsilon.
        progress = {k: v for k, v in progress.items() if k in ("epoch", "epochs", "seconds")}
    return JobStatus(job_id=job["id"], state=job["state"], seq=job["seq"], reason=job.get("reason", ""),
                     progress=progress, timings=job.get("timings", {}))


class Daemon:
    def __init__(self, *, identity: Identity, store: Store, pool: Any, config: DaemonConfig,
                 lane: Lane | None = None, offers: SharedOffers | None = None) -> None:
        self.identity, self.store, self.pool, self.config = identity, store, pool, config
        self.lane, self.offers = lane, offers
        # weights pulled recently, so that a node is not sent them again: by a retry after a refusal (busy, budget),
        # or by another job with the same weights after the first one's plan left the store (a job's plan is dropped
        # from the store when it ends). Bounded: at most 64 MB of the daemon's memory (`peers.json` shows it).
        self.pulled = BlobCache(max_bytes=64 << 20)
        self.stats: Counter[str] = Counter()  # weights_pulled, weights_deduplicated, results_by_reference
        self._changed = trio.Event()
        self._work = trio.Event()

    # -- notifications ---------------------------------------------------------------------------------------------
    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    # -- /hivecell/dataset/1.0.0 -----------------------------------------------------------------------------------
    async def handle_dataset(self, peer: str, message: Message, reply: Reply) -> None:
        if not isinstance(message, ListDatasets):
            raise RemoteError(ErrorCode.BAD_MESSAGE, "expected a dataset list request")
        records, owner = await trio.to_thread.run_sync(
            lambda: (self.store.list_datasets(), load_owner(self.store, self.identity)))
        await reply.send(DatasetList(adverts=[
            make_advert(self.identity, r, owner=owner.owner, delegation=owner.delegation) for r in records]))

    # -- /hivecell/job/1.0.0 ---------------------------------------------------------------------------------------
    async def handle_job(self, peer: str, message: Message, reply: Reply) -> None:
        if isinstance(message, SubmitJob):
            job = await self._submit(peer, message)
            await reply.send(JobAccepted(job_id=job["id"], state=job["state"]))
            if message.wait_s > 0:  # the same stream carries the result (or why there is none yet)
                await reply.send(await self._fetch(peer, FetchResult(job_id=job["id"], wait_s=message.wait_s),
                                                   message.lane))
        elif isinstance(message, WatchJob):
            await reply.send(_status(await self._watch(peer, message)))
        elif isinstance(message, FetchResult):
            await reply.send(await self._fetch(peer, message, message.lane))
        else:
            raise RemoteError(ErrorCode.BAD_MESSAGE, "not a request")

    async def _submit(self, peer: str, msg: SubmitJob) -> dict[str, Any]:
        try:
            request = open_record(msg.request, domain=JOB_DOMAIN)
        except InvalidRecord as exc:
            logger.info("job request from %s refused: %s", short(peer), exc.reason)
            if exc.reason in ("expired", "issued in the future"):
                raise RemoteError(ErrorCode.EXPIRED, "the job request is expired or not yet valid; check the clocks")
            raise RemoteError(ErrorCode.BAD_SIGNATURE, "the job request is not validly signed") from None
        if request.signer != peer:
            raise RemoteError(ErrorCode.FORBIDDEN, "the job request must be signed by the peer that sends it")
        if request.expires_at - request.issued_at > JOB_REQUEST_MAX_TTL_S:
            raise RemoteError(ErrorCode.EXPIRED, f"a job request may be valid for at most {JOB_REQUEST_MAX_TTL_S} s")
        if request.nonce is None:
            raise RemoteError(ErrorCode.BAD_MESSAGE, "a job request needs a nonce")
        f = request.fields()
        job_id, node, dataset_name, p_hash, recipe = (f.get(k) for k in ("job_id", "node", "dataset", "plan_hash",
                                                                         "recipe"))
        if not (isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) and isinstance(node, str)
                and isinstance(dataset_name, str) and isinstance(p_hash, str) and _HASH.fullmatch(p_hash)):
            raise RemoteError(ErrorCode.BAD_MESSAGE, "a job request has job_id (32 hex), node, dataset, plan_hash")
        try:
            check_name(dataset_name)
        except DatasetError:
            raise RemoteError(ErrorCode.UNKNOWN_DATASET, "not a dataset name") from None
        if node != self.identity.peer_id:
            raise RemoteError(ErrorCode.WRONG_NODE, "this job request is addressed to another node")
        if msg.weights_ref:
            msg = await self._pull_weights(peer, msg, request.nonce)
        # Everything below touches the store or hashes the plan: one trip to a thread, not one per step (each costs
        # the event loop a wake-up; a FedAvg round on a small model is mostly such costs).
        job = await trio.to_thread.run_sync(lambda: self._accept(peer, request, msg, job_id, dataset_name, p_hash,
                                                                 recipe))
        logger.info("job %s queued: dataset %s, scientist %s", job_id, dataset_name, short(peer))
        self._work.set()
        self._notify()
        return job

    async def _pull_weights(self, peer: str, msg: SubmitJob, nonce: Any) -> SubmitJob:
        """The request with its weights inline: from this node's store or cache when it has the blob already (a plan
        sent again, a model shared by several jobs), else pulled from the sender's lane (or libp2p stream). The bytes
        are checked against the reference here and against the signed plan_hash in :meth:`_accept`."""
        ref = msg.weights_ref
        if self.lane is None:
            raise RemoteError(ErrorCode.BAD_MESSAGE, "this node takes weights inline only")
        limit = min(self.lane.config.max_blob, self.config.worker_memory_mb << 20)
        if msg.weights_size > limit:
            raise RemoteError(ErrorCode.TOO_LARGE, f"weights of {msg.weights_size} bytes; this node takes at most "
                                                   f"{limit}")
        seen, queued, held = await trio.to_thread.run_sync(lambda: (
            self.store.nonce_seen(nonce), self.store.count_jobs(peer), self.store.get_blob(ref)))
        if seen:  # checked again in _accept, in the transaction; here so that a replay costs no transfer
            raise RemoteError(ErrorCode.REPLAY, "this job request was already received")
        self._check_queue(queued)
        if held is None:
            deduplicated = ref in self.pulled  # fetch_blob answers from the cache then
            try:
                blob = await fetch_blob(self.lane, peer, ref, cache=self.pulled, timeout=WEIGHTS_FETCH_S)
            except BlobTooLarge:
                raise RemoteError(ErrorCode.TOO_LARGE, "the weights are larger than announced or allowed") from None
            except BlobUnavailable:
                raise RemoteError(ErrorCode.BAD_MESSAGE, "the weights referred to are not offered to this node"
                                  ) from None
            except LaneError as exc:
                logger.info("pulling weights %s from %s failed: %s", ref[:12], short(peer), exc)
                raise RemoteError(ErrorCode.UNAVAILABLE, f"could not pull the weights: {exc}") from None
            held = bytes(blob)
        else:
            deduplicated = True
        self.stats["weights_deduplicated" if deduplicated else "weights_pulled"] += 1
        if len(held) != msg.weights_size:
            raise RemoteError(ErrorCode.BAD_MESSAGE, "the weights' size is not the one announced")
        return replace(msg, weights=held, weights_ref="", weights_size=0)

    def _check_queue(self, queued: dict[str, int]) -> None:
        """Refuse a job when this scientist, or everyone together, has as many waiting as the node takes."""
        if queued["mine"] >= self.config.max_queued_per_peer or queued["all"] >= self.config.max_queued:
            raise RemoteError(ErrorCode.BUSY, "too many jobs waiting on this node; try again later")

    def _accept(self, peer: str, request: Any, msg: SubmitJob, job_id: str, dataset_name: str, p_hash: str,
                recipe: Any) -> dict[str, Any]:
        """Check a signed job request against the store, audit and price its plan, and queue it (in a thread)."""
        if self.store.nonce_seen(request.nonce):
            logger.info("replayed job request %s from %s", job_id, short(peer))
            raise RemoteError(ErrorCode.REPLAY, "this job request was already received")
        dataset = self.store.get_dataset(dataset_name)
        if dataset is None:
            raise RemoteError(ErrorCode.UNKNOWN_DATASET, f"no dataset named {dataset_name[:64]!r} on this node")
        try:
            normalized = validate_recipe(recipe).to_dict()
            if normalized["task"] != dataset["schema"]["task"]:
                raise PlanError("bad_recipe", f"the dataset is for {dataset['schema']['task']}, "
                                              f"the recipe asks for {normalized['task']}")
            audit_program(msg.program)
            audit_weights(msg.weights)
        except PlanError as exc:
            logger.info("job %s from %s refused: %s", job_id, short(peer), exc.message)
            raise RemoteError(exc.code, exc.message) from None
        program_key, weights_key = sha256_hex(msg.program), sha256_hex(msg.weights)  # each hashed once, here
        if plan_hash_of(program_key, weights_key, recipe) != p_hash:
            raise RemoteError(ErrorCode.BAD_PLAN, "the plan does not match the plan_hash the request signs")
        self._check_queue(self.store.count_jobs(peer))
        if not self.store.remember_nonce(request.nonce, request.expires_at):
            raise RemoteError(ErrorCode.REPLAY, "this job request was already received")
        try:  # priced before anything runs, with the numbers the Worker will use (same rows, same sampling)
            epsilon, delta = price_job(normalized, dataset["schema"]["num_samples"])
        except PlanError as exc:
            raise RemoteError(exc.code, exc.message) from None
        job = jobsm.new_job(
            job_id=job_id, dataset=dataset_name, scientist=peer, plan_hash=p_hash, recipe=normalized,
            epsilon=epsilon, delta=delta, program_key=program_key, weights_key=weights_key, request=msg.request,
            policy=dataset["signoff"],
        )
        job["timings"] = {"received": job["created"]}
        try:
            self.store.create_job(job, [(program_key, msg.program), (weights_key, msg.weights)],
                                  ledger=(self.identity, reserve_entry),
                                  max_queued=(self.config.max_queued_per_peer, self.config.max_queued))
        except QueueFull:  # concurrent submits that passed the check above together
            raise RemoteError(ErrorCode.BUSY, "too many jobs waiting on this node; try again later") from None
        except StoreError:
            raise RemoteError(ErrorCode.REPLAY, "a job with this id exists") from None
        except LedgerError as exc:  # the reservation does not fit the dataset's budget: nothing was stored
            logger.info("job %s from %s refused: %s", job_id, short(peer), exc)
            raise RemoteError(ErrorCode.BUDGET_EXCEEDED, str(exc)) from None
        return job

    async def _own_job(self, peer: str, job_id: str) -> dict[str, Any]:
        job = await trio.to_thread.run_sync(self.store.get_job, job_id) if _JOB_ID.fullmatch(job_id) else None
        if job is None or job["scientist"] != peer:  # another scientist's job does not exist, as far as you know
            raise RemoteError(ErrorCode.UNKNOWN_JOB, "no such job")
        return job

    async def _watch(self, peer: str, msg: WatchJob) -> dict[str, Any]:
        if msg.until_done:  # one answer per job for a caller that wants no progress
            return await self._wait_done(peer, msg.job_id, msg.wait_s)
        job = await self._own_job(peer, msg.job_id)
        with trio.move_on_after(max(0.0, min(msg.wait_s, MAX_WATCH_S))):
            while job["seq"] <= msg.since:
                job = await self._next_change(peer, msg.job_id)
        return job

    async def _wait_done(self, peer: str, job_id: str, wait_s: float) -> dict[str, Any]:
        """The job once it is released, withheld or failed, or as it is after ``wait_s`` (at most MAX_WATCH_S)."""
        job = await self._own_job(peer, job_id)
        with trio.move_on_after(max(0.0, min(wait_s, MAX_WATCH_S))):
            while jobsm.JobState(job["state"]) not in jobsm.TERMINAL:
                job = await self._next_change(peer, job_id)
        return job

    async def _next_change(self, peer: str, job_id: str) -> dict[str, Any]:
        with trio.move_on_after(1.0):  # also notice changes made by the CLI in another process
            await self._changed.wait()
        return await self._own_job(peer, job_id)

    async def _fetch(self, peer: str, msg: FetchResult, wants_lane: bool = False) -> JobResultMsg:
        job = await self._wait_done(peer, msg.job_id, msg.wait_s)
        state = job["state"]
        if state == jobsm.JobState.WITHHELD.value:
            reason = job.get("reason", "")
            raise RemoteError(ErrorCode.WITHHELD, "the data owner did not sign off this result"
                                                  + (f": {reason[:300]}" if reason else ""))
        if state == jobsm.JobState.FAILED.value:
            raise RemoteError(ErrorCode.JOB_FAILED, job.get("reason", "")[:300])
        if state != jobsm.JobState.RELEASED.value:
            raise RemoteError(ErrorCode.NOT_READY, f"the job is {state}")
        result = await trio.to_thread.run_sync(self.store.get_blob, job["result_hash"])
        if result is None:
            raise RemoteError(ErrorCode.INTERNAL, "the result is missing")
        if wants_lane and self.offers is not None and len(result) > self.config.lane_threshold:
            ref = await self.offers.hold(result, peer, sha256=job["result_hash"])
            self.offers.release_later(ref, peer, RESULT_OFFER_S)
            self.stats["results_by_reference"] += 1
            return JobResultMsg(job_id=job["id"], result=b"", signoff=job["signoff"], timings=job.get("timings", {}),
                                result_ref=ref, result_size=len(result))
        return JobResultMsg(job_id=job["id"], result=result, signoff=job["signoff"], timings=job.get("timings", {}))

    # -- running jobs ----------------------------------------------------------------------------------------------
    async def run_jobs(self) -> None:
        """Take queued jobs from the store, oldest first, and run each in a Worker. Never returns."""
        while True:
            try:
                job = await trio.to_thread.run_sync(self._claim)
            except Exception:  # a corrupt record or a full disk: log, back off, keep serving
                logger.exception("cannot take the next job from the store")
                await trio.sleep(10)
                continue
            if job is None:
                with trio.move_on_after(5.0):  # a submit sets _work; the timeout also picks up re-queued jobs
                    await self._work.wait()
                self._work = trio.Event()
                continue
            self._notify()
            try:
                await self._run(job)
            except Exception:  # a bug of ours must cost one job, not the daemon
                logger.exception("job %s: internal error", job["id"])
                try:
                    await self._fail(job["id"], "internal: the node hit an error running this job")
                except Exception:
                    logger.exception("job %s: cannot record the failure", job["id"])
                    await trio.sleep(10)
            self._notify()

    def _claim(self) -> dict[str, Any] | None:
        now = time.time()
        return self.store.claim_next_job(
            jobsm.JobState.QUEUED.value,
            lambda j: jobsm.transition(j, jobsm.JobState.RUNNING, now=now, attempts=j.get("attempts", 0) + 1,
                                       reason="", timings=dict(j.get("timings", {}), started=now)),
        )

    async def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        dataset, program, weights = await trio.to_thread.run_sync(lambda: (
            self.store.get_dataset(job["dataset"]), self.store.get_blob(job["program_key"]),
            self.store.get_blob(job["weights_key"])))
        if dataset is None or program is None or weights is None:
            await self._fail(job_id, "the dataset or the plan is no longer on this node")
            return
        logger.info("job %s running (attempt %d)", job_id, job["attempts"])

        async def on_progress(progress: dict[str, Any]) -> None:
            await trio.to_thread.run_sync(self.store.update_job, job_id, lambda j: jobsm.touch(j, progress=progress))
            self._notify()

        limits = WorkerLimits(wall_s=self.config.worker_wall_s, memory_mb=self.config.worker_memory_mb,
                              threads=self.config.worker_threads)
        work = WorkerJob(job_id=job_id, store_path=str(self.store.path), data_key=dataset["data_key"],
                         program=program, weights=weights, recipe=job["recipe"],
                         reuse_key=repr((job["scientist"], job["dataset"], job["program_key"])))
        try:
            result = await self.pool.run_job(work, limits=limits, on_progress=on_progress)
        except WorkerFailed as exc:
            logger.info("job %s failed: %s (%s)", job_id, exc.code, exc.reason)
            await self._fail(job_id, f"{exc.code}: {exc.reason}")
            return
        except BaseException as exc:
            if _is_cancellation(exc):
                # The daemon is stopping (SIGTERM): the job goes back to the queue without using up an attempt;
                # only a crash (kill -9, power cut) counts against max_attempts.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.store.update_job, job_id, lambda j: jobsm.requeue(j))
                logger.info("job %s re-queued: the daemon is stopping", job_id)
            raise
        timings = dict(result.timings, finished=time.time())
        record = await trio.to_thread.run_sync(
            lambda: complete_job(self.store, self.identity, job_id, weights=result.weights, metrics=result.metrics,
                                 timings=timings, policy=job["policy"]))
        logger.info("job %s %s on %s: %s", job_id, record["state"], result.device, result.metrics)

    async def _fail(self, job_id: str, reason: str) -> None:
        def change(job: dict[str, Any]) -> dict[str, Any]:
            if job["state"] != jobsm.JobState.RUNNING.value:
                return job
            return jobsm.transition(job, jobsm.JobState.FAILED, reason=reason[:500])

        await trio.to_thread.run_sync(lambda: self.store.update_job(
            job_id, change, drop=plan_blobs, ledger=(self.identity, fail_entry)))


def _is_cancellation(exc: BaseException) -> bool:
    """``Cancelled``, or an exception group (nurseries wrap) that holds nothing else."""
    return all(isinstance(e, trio.Cancelled) for e in leaves(exc))


def recover_jobs(store: Store, identity: Identity, *, max_attempts: int) -> list[dict[str, Any]]:
    """Apply the restart rule (see job.py) to every job left ``running`` by a previous daemon; a job failed by it
    gets its reservation refunded in the same transaction (a re-queued one keeps it, and settles it once it runs)."""
    changed = []
    for job in store.list_jobs():
        if job["state"] == jobsm.JobState.RUNNING.value:
            changed.append(store.update_job(job["id"], lambda j: jobsm.recover(j, max_attempts=max_attempts),
                                            ledger=(identity, fail_entry)))
    return changed


async def serve_daemon(home: Home, config: DaemonConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon of ``home`` until cancelled. ``task_status.started`` receives the listen addresses."""
    with home.daemon_lock():
        home.daemon_file.unlink(missing_ok=True)  # a killed daemon's addresses are not ours
        identity, _ = home.init()
        await _serve_locked(home, identity, config, task_status=task_status)


async def _serve_locked(home: Home, identity: Identity, config: DaemonConfig, *, task_status) -> None:
    store = Store.open(home.store_path)
    try:
        for job in recover_jobs(store, identity, max_attempts=config.max_attempts):
            logger.warning("job %s was interrupted by a restart: now %s", job["id"], job["state"])
        # Resolved before anything starts, so a wrong interface name stops the daemon with a clear message.
        mdns_ips = resolve_interfaces(config.mdns_interfaces) if config.mdns else []
        if config.mdns and not mdns_ips:
            logger.warning("mDNS: no interface with an IPv4 address besides loopback; LAN discovery is off")
        index = AdvertIndex()
        loaded = await trio.to_thread.run_sync(load_index, store, index)
        lane_config = LaneConfig(listen_host=lane_listen_host(config.listen), port=config.lane_port, lane=config.lane,
                                 max_blob=min(MAX_BLOB_REF_BYTES, config.worker_memory_mb << 20))
        async with open_worker_pool(warm=config.warm_workers, gpu=config.gpu, fork=config.worker_fork) as pool, \
                open_host(identity, config.listen) as host, open_lane(host, lane_config) as lane, \
                trio.open_nursery() as nursery:
            daemon = Daemon(identity=identity, store=store, pool=pool, config=config, lane=lane,
                            offers=SharedOffers(lane, nursery))
            host.serve(DATASET_PROTOCOL, daemon.handle_dataset)
            host.serve(JOB_PROTOCOL, daemon.handle_job)
            addrs = host.addrs()
            gossip = await open_gossip(host, index, GossipConfig(index=config.index), nursery)
            dht = MeshDht(host, server=True)
            await nursery.start(dht.serve)
            discovery = Discovery(host, mdns_ips=mdns_ips, bootstrap=config.bootstrap)
            await nursery.start(discovery.serve)
            advertiser = Advertiser(identity=identity, store=store, gossip=gossip,
                                    addrs=advert_addrs(addrs, mdns_ips), ttl=config.advert_ttl, dht=dht)
            await nursery.start(advertiser.serve)
            nursery.start_soon(_write_peers, home, discovery, gossip, daemon)
            home.write_daemon_info({"peer_id": identity.peer_id, "addrs": addrs})
            logger.info("node %s listening on %s; index %s with %d adverts", identity.peer_id, ", ".join(addrs),
                        "on" if config.index else "off", loaded)
            task_status.started(addrs)
            try:
                for _ in range(config.max_concurrent_jobs):
                    nursery.start_soon(daemon.run_jobs)
                await trio.sleep_forever()
            finally:
                home.clear_daemon_info()
                home.peers_file.unlink(missing_ok=True)
    finally:
        store.close()


def advert_addrs(listen: list[str], mdns_ips: list[str]) -> list[str]:
    """The addresses an advert gives for this node: listen addresses reachable from the LAN (``0.0.0.0`` becomes one
    per interface address); a node that listens on loopback only advertises that (a one-machine mesh)."""
    ips = mdns_ips or resolve_interfaces(None)
    out = announce_addrs(listen, ips) if ips else []
    return out or [a for a in listen if "/ip4/0.0.0.0/" not in a]


async def _write_peers(home: Home, discovery: Discovery, gossip, daemon: Daemon) -> None:
    """Keep ``peers.json`` current for ``hivecell peers`` (a file: the CLI need not speak to the daemon)."""
    last = None
    while True:
        info = {"peer_id": discovery.host.peer_id, "peers": discovery.snapshot(),
                "index": {"role": gossip.config.index, "adverts": len(gossip.index), "digest": gossip.index.digest(),
                          "counters": dict(gossip.index.counters), "messages": dict(gossip.messages)},
                "lane": lane_summary(daemon)}
        view = (info["peers"], info["index"]["digest"], info["index"]["counters"], info["lane"])
        if view != last:
            try:
                await trio.to_thread.run_sync(home.write_peers, info)
                last = view
            except OSError as exc:
                logger.warning("cannot write %s: %s", home.peers_file, exc)
        await trio.sleep(1.0)


def lane_summary(daemon: Daemon) -> dict[str, Any]:
    """The bulk lane's state for ``peers.json``: its port, transfers by way (lane or libp2p stream), fallbacks."""
    lane = daemon.lane
    if lane is None:
        return {"enabled": False}
    return {"enabled": lane.config.lane, "port": lane.port, "offered": len(lane.offered()),
            "pulled_cache_bytes": daemon.pulled.size, "stats": dict(lane.stats) | dict(daemon.stats)}
