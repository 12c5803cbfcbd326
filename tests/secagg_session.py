"""SecAgg+ sessions in one process, for tests that need the sum a server could unmask: each site runs Flower 1.41's
own client mod behind OncoFed's `site_policy_mod` (masks installed by importing client.app), and the server side
does what Flower's SecAggPlusWorkflow does stage by stage (same configs, share forwarding and unmask arithmetic,
dropped sites' pairwise masks included). The train handler is a stub that returns the site's fixed update, as a
released round's resend (or a retrain to the same bits) does. From the secure-aggregation review's driver
(/tmp/s49/secagg_exp/driver.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitIns, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (factor_extract, parameters_addition, parameters_mod,
                                                                parameters_subtraction)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, fitres_to_recorddict
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

import client.app as site_app  # installs OncoFed's masks in Flower's modules
import flwr.server.workflow.secure_aggregation.secaggplus_workflow as workflow
from shared_models.protocol import RUN_KEY, SERVER_ROUND

CLIP, Q, MOD, MAX_WEIGHT = 1.0, 2 ** 29, 2 ** 32, 1000.0


class Site:
    """A deployed site (its own state directory) with SecAgg+ node id `nid` and a fixed update `x`."""

    def __init__(self, name: str, nid: int, root: Path, run: dict, x: np.ndarray, weight: int = 500):
        self.name, self.nid, self.x, self.weight, self.run = name, nid, x, weight, run
        self.node = {"data-path": str(root / name / "data"), "state-dir": str(root / name / "state"),
                     "min-aggregate-sites": 2, "require-dp": False}
        self.new_session()

    def new_session(self) -> None:
        """A new Flower run, as a resumed server starts: the site's context (SecAgg+ state) is new, its files stay."""
        self.context = Context(run_id=1, node_id=self.nid, node_config=self.node, state=RecordDict(),
                               run_config=self.run)

    def _train(self, msg: Message, context: Context) -> Message:
        context.state.config_records["oncofed"] = ConfigRecord({RUN_KEY: "run-X", SERVER_ROUND: 1})
        res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([self.x]), self.weight, {})
        return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    def handle(self, content: RecordDict) -> Message:
        meta = Metadata(run_id=1, message_id=f"m{time.time_ns()}", src_node_id=0, dst_node_id=self.nid,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type=MessageType.TRAIN)
        msg = Message(content, metadata=meta)
        if content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.SETUP:  # its checks read site tables
            return site_app.secaggplus_mod(msg, self.context, self._train)
        return site_app.site_policy_mod(msg, self.context, self._train)


def session(sites: list[Site], unmask_at: list[Site] | None = None, threshold: float = 0.66):
    """One SecAgg+ session of round 1 of run-X over `sites`; `unmask_at`: the sites whose unmask replies arrive
    (default all that sent masked vectors); `threshold`: the run's secagg-threshold. Returns (the unmasked weighted mean, None if the server cannot unmask
    it; {site name: refusal reason}; the sites whose masked vectors the server got)."""
    t = max(round(threshold * len(sites)), 2)  # as Flower's SecAggPlusWorkflow sets it
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(sites), Key.SHARE_NUMBER: len(sites), Key.THRESHOLD: t,
             Key.CLIPPING_RANGE: CLIP, Key.TARGET_RANGE: Q, Key.MOD_RANGE: MOD, Key.MAX_WEIGHT: MAX_WEIGHT}
    keys = {}
    for s in sites:
        c = s.handle(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(setup))})).content.config_records[RECORD_KEY_CONFIGS]
        keys[s.nid] = [c[Key.PUBLIC_KEY_1], c[Key.PUBLIC_KEY_2]]
    forwarded = {s.nid: ([], []) for s in sites}
    for s in sites:
        c = s.handle(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({**{str(k): v for k, v in keys.items()},
                                                                   Key.STAGE: Stage.SHARE_KEYS})}))
        c = c.content.config_records[RECORD_KEY_CONFIGS]
        for dst, ct in zip(c[Key.DESTINATION_LIST], c[Key.CIPHERTEXT_LIST]):
            forwarded[dst][0].append(ct)
            forwarded[dst][1].append(s.nid)
    refused, masked, sent = {}, None, []
    for s in sites:
        content = fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(1)]), {RUN_KEY: "run-X",
                                                                                       SERVER_ROUND: 1}), True)
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({
            Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: forwarded[s.nid][0],
            Key.SOURCE_LIST: forwarded[s.nid][1]})
        reply = s.handle(content)
        if reply.has_error():
            refused[s.name] = reply.error.reason
            continue
        vec = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        masked = vec if masked is None else parameters_addition(masked, vec)
        sent.append(s)
    active, dead = sorted(s.nid for s in sent), sorted(s.nid for s in sites if s not in sent)
    shares = {}
    for s in sent if unmask_at is None else [u for u in unmask_at if u in sent]:
        reply = s.handle(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
            Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})}))
        if reply.has_error():
            refused[s.name] = reply.error.reason
            continue
        c = reply.content.config_records[RECORD_KEY_CONFIGS]
        for nid, share in zip(c[Key.NODE_ID_LIST], c[Key.SHARE_LIST]):
            shares.setdefault(nid, []).append(share)
    if not sent or any(len(shares.get(nid, [])) < t for nid in active + dead):
        return None, refused, sent
    vec = parameters_mod(masked, MOD)
    shapes = [a.shape for a in vec]
    for nid in active:  # each sender's self mask, from its seed's shares
        vec = parameters_subtraction(vec, workflow.pseudo_rand_gen(combine_shares(shares[nid]), MOD, shapes))
    for nid in dead:  # the pairwise masks the senders drew with a site that sent nothing, from its key's shares
        sk1 = bytes_to_private_key(combine_shares(shares[nid]))
        for other in active:
            mask = workflow.pseudo_rand_gen(generate_shared_key(sk1, bytes_to_public_key(keys[other][0])), MOD, shapes)
            vec = parameters_addition(vec, mask) if nid > other else parameters_subtraction(vec, mask)
    q_total, rest = factor_extract(parameters_mod(vec, MOD))
    return (dequantize(rest, CLIP, Q)[0] - (len(active) - 1) * CLIP) * (Q / q_total), refused, sent
