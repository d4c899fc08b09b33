"""The SecAgg+ masking protocol (Bell et al. 2020) over Flower's primitives, independent of the transport.

The second door to ``flwr`` beside ``fedmnist.flower_app``, and a narrow one: it imports only the
cryptographic primitives of ``flwr.common.secure_aggregation`` (ECDH key agreement + HKDF and Fernet
authenticated encryption, Shamir shares, the mask generator ``pseudo_rand_gen``, the stage and key
names) and ``flwr.supercore.primitives.asymmetric`` (EC key pairs). No cryptography is written here.
Flower's own drivers (``secaggplus_mod``, ``SecAggPlusWorkflow``) run only on its legacy strategy
path; this module drives the same four stages for a Message-API app, and the arithmetic that makes
the integers (``fedmnist.secure_aggregation``) stays free of Flower so the simulation can share it.

Stages (server → node, node → server), as in Flower's ``SecAggPlusWorkflow``:

0. setup: (m, k, t, M) → the node's two public keys pk1 (masking) and pk2 (encryption);
1. share keys: its neighbours' public keys → its seed b_u and key sk1_u, each Shamir-shared t-of-k
   among its neighbours, every share encrypted for its receiver (the server only forwards them);
2. collect masked vectors: the ciphertexts addressed to it → y_u = x_u + PRG(b_u) ± Σ_v PRG(s_uv)
   mod M, x_u its encoded reply and s_uv the key it agrees with neighbour v (the member trains here);
3. unmask: which neighbours survived stage 2 → its share of b_v for each survivor and of sk1_v for
   each node that vanished after sending its shares (never both for one node).

The server (``run_server``) sums the masked vectors, removes each survivor's PRG(b_u) and the
pairwise masks that dropped nodes left behind, and returns only the sum of the survivors' integer
vectors. It talks to the nodes through an injected ``exchange(stage, payloads) -> replies``; nodes
missing from the replies have vanished. Below t live neighbours for any node the round is aborted
with ``SecureAggregationAborted`` and no sum. Payloads, replies and the node's state are plain dicts
whose values a Flower ``ConfigRecord`` holds (int, float, str, bytes, lists of one of them); the
masked vector travels as little-endian uint32 bytes (int64 when M > 2^32; never pickled).

Limits inherited from Flower's primitives: ``pseudo_rand_gen`` seeds NumPy's Mersenne Twister with a
32-bit fold of the key, so each mask has 32 bits of seed (recovering one masked vector means guessing
its private seed and every pairwise seed together); the model is honest-but-curious (no signatures
or consistency round against a server that lies about who dropped).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedmnist.secure_aggregation import ProtocolParams, SecureAggregationAborted, SecureAggregationError

log = logging.getLogger(__name__)

STAGES = Stage.all()
"""setup, share_keys, collect_masked_vectors, unmask: Flower's names, in order."""

PK1S, PK2S, MASKED = "pk1s", "pk2s", Key.MASKED_PARAMETERS
"""Keys of this module's payloads beside Flower's ``Key`` names."""

Exchange = Callable[[str, dict[int, dict]], Mapping[int, dict]]
"""``exchange(stage, {node_id: payload})`` → ``{node_id: reply}`` of the nodes that answered."""


# --- helpers -------------------------------------------------------------------------------------


def _fail(message: str) -> None:
    raise SecureAggregationError(message)


def _typed_list(payload: Mapping, key: str, kind: type) -> list:
    value = payload.get(key)
    if not isinstance(value, list) or any(type(v) is not kind for v in value):
        _fail(f"secure aggregation: '{key}' must be a list of {kind.__name__}")
    return list(value)


def _typed(payload: Mapping, key: str, kind: type):
    value = payload.get(key)
    if type(value) is not kind:
        _fail(f"secure aggregation: '{key}' must be a {kind.__name__} (got {type(value).__name__})")
    return value


def _mask(seed: bytes, modulus: int, length: int) -> np.ndarray:
    return pseudo_rand_gen(seed, modulus, [(length,)])[0].astype(np.int64)


def _pairwise_seed(private_key: bytes, public_key: bytes) -> bytes:
    return generate_shared_key(bytes_to_private_key(private_key), bytes_to_public_key(public_key))


def _wire_dtype(modulus: int) -> str:
    return "<u4" if modulus <= 2**32 else "<i8"


def vector_to_bytes(vector: np.ndarray, modulus: int) -> bytes:
    """Residues mod ``modulus`` as little-endian bytes: uint32 when M <= 2^32 (the default), else int64."""
    return np.ascontiguousarray(vector, dtype=_wire_dtype(modulus)).tobytes()


def bytes_to_vector(data: bytes, length: int, modulus: int) -> np.ndarray:
    """The int64 vector of ``length`` residues mod ``modulus`` in ``data``; SecureAggregationError otherwise."""
    dtype = np.dtype(_wire_dtype(modulus))
    if not isinstance(data, bytes) or len(data) != dtype.itemsize * length:
        _fail(f"a masked vector must be {dtype.itemsize * length} bytes ({length} values)")
    vector = np.frombuffer(data, dtype=dtype).astype(np.int64)
    if vector.min(initial=0) < 0 or vector.max(initial=0) >= modulus:
        _fail(f"a masked vector has values outside [0, {modulus})")
    return vector


def _check_params(sample_num: int, share_num: int, threshold: int, modulus: int) -> None:
    """A node's own check of the server's settings: it will not share its secrets under a weak t."""
    if not (2 <= threshold <= share_num <= sample_num and 2 * threshold > share_num):
        _fail(f"secure aggregation refused: threshold {threshold} with {share_num} shares of {sample_num} nodes "
              "(need 2 <= t <= k <= m and t > k/2)")
    if modulus < 2 or modulus & (modulus - 1):
        _fail(f"secure aggregation refused: modulus {modulus} is not a power of two")


# --- node side -----------------------------------------------------------------------------------


def _expect(state: Mapping, stage: str) -> None:
    previous = STAGES[STAGES.index(stage) - 1]
    if state.get("stage") != previous:
        _fail(f"secure aggregation: stage '{stage}' must follow '{previous}', but the node is at "
              f"'{state.get('stage', 'none')}'")


def client_setup(inbound: Mapping, state: Mapping, node_id: int) -> tuple[dict, dict]:
    """Stage 0: check the server's (m, k, t, M), make fresh key pairs; reply with the public keys.

    Any previous round's state is dropped. Returns ``(reply, new_state)``.
    """
    del state  # a setup always starts afresh
    params = [_typed(inbound, key, int) for key in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD,
                                                    Key.MOD_RANGE)]
    _check_params(*params)
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    new_state = {"stage": Stage.SETUP, "nid": int(node_id), Key.SAMPLE_NUMBER: params[0],
                 Key.SHARE_NUMBER: params[1], Key.THRESHOLD: params[2], Key.MOD_RANGE: params[3],
                 "sk1": private_key_to_bytes(sk1), "pk1": public_key_to_bytes(pk1),
                 "sk2": private_key_to_bytes(sk2), "pk2": public_key_to_bytes(pk2)}
    return {Key.PUBLIC_KEY_1: new_state["pk1"], Key.PUBLIC_KEY_2: new_state["pk2"]}, new_state


def client_share_keys(inbound: Mapping, state: Mapping) -> tuple[dict, dict]:
    """Stage 1: from its neighbours' public keys (itself included), Shamir-share a fresh mask seed b_u
    and its key sk1_u t-of-k and encrypt each share for its neighbour; reply with the ciphertexts."""
    _expect(state, Stage.SHARE_KEYS)
    nids = _typed_list(inbound, Key.NODE_ID_LIST, int)
    pk1s, pk2s = _typed_list(inbound, PK1S, bytes), _typed_list(inbound, PK2S, bytes)
    me, threshold = state["nid"], state[Key.THRESHOLD]
    if not (len(nids) == len(pk1s) == len(pk2s)) or len(set(nids)) != len(nids):
        _fail("secure aggregation: the neighbours' ids and keys do not match one to one")
    if not threshold <= len(nids) <= state[Key.SHARE_NUMBER]:
        _fail(f"secure aggregation: {len(nids)} neighbours, need between t = {threshold} and "
              f"k = {state[Key.SHARE_NUMBER]}")
    if len(set(pk1s + pk2s)) != 2 * len(nids):
        _fail("secure aggregation: some public keys are identical")
    if me not in nids or (pk1s[nids.index(me)], pk2s[nids.index(me)]) != (state["pk1"], state["pk2"]):
        _fail("secure aggregation: the node's own public keys are missing or altered")
    seed = os.urandom(32)
    seed_shares = create_shares(seed, threshold, len(nids))
    key_shares = create_shares(state["sk1"], threshold, len(nids))
    dsts, ciphertexts = [], []
    for nid, pk2, seed_share, key_share in zip(nids, pk2s, seed_shares, key_shares):
        if nid == me:
            own = (seed_share, key_share)
            continue
        plaintext = share_keys_plaintext_concat(me, nid, seed_share, key_share)
        dsts.append(nid)
        ciphertexts.append(encrypt(_pairwise_seed(state["sk2"], pk2), plaintext))
    new_state = {**state, "stage": Stage.SHARE_KEYS, "rd_seed": seed, "nbr_nids": nids, "nbr_pk1s": pk1s,
                 "nbr_pk2s": pk2s, "seed_share_nids": [me], "seed_shares": [own[0]],
                 "key_share_nids": [me], "key_shares": [own[1]]}
    return {Key.DESTINATION_LIST: dsts, Key.CIPHERTEXT_LIST: ciphertexts}, new_state


def client_collect_masked_vectors(inbound: Mapping, state: Mapping, encoded: np.ndarray) -> tuple[dict, dict]:
    """Stage 2: decrypt and keep the neighbours' shares, then mask ``encoded`` (the node's integer vector,
    ``secure_aggregation.encode_contribution``) with PRG(b_u) and one pairwise mask per neighbour that
    sent shares (+ towards smaller ids, − towards larger ones) modulo M; reply with the masked bytes."""
    _expect(state, Stage.COLLECT_MASKED_VECTORS)
    srcs = _typed_list(inbound, Key.SOURCE_LIST, int)
    ciphertexts = _typed_list(inbound, Key.CIPHERTEXT_LIST, bytes)
    me, modulus = state["nid"], state[Key.MOD_RANGE]
    if len(srcs) != len(ciphertexts) or len(set(srcs)) != len(srcs) or me in srcs:
        _fail("secure aggregation: the forwarded shares' sources do not match the ciphertexts")
    if len(srcs) + 1 < state[Key.THRESHOLD]:
        _fail(f"secure aggregation: shares from {len(srcs)} neighbours, below the threshold t = "
              f"{state[Key.THRESHOLD]} (counting the node itself)")
    vector = np.asarray(encoded)
    if vector.ndim != 1 or not np.issubdtype(vector.dtype, np.integer) or vector.size == 0 \
            or vector.min() < 0 or vector.max() >= modulus:
        _fail(f"secure aggregation: the encoded vector must be a non-empty 1-D integer array in [0, {modulus})")
    neighbours = dict(zip(state["nbr_nids"], zip(state["nbr_pk1s"], state["nbr_pk2s"])))
    seed_nids, seed_shares = list(state["seed_share_nids"]), list(state["seed_shares"])
    key_nids, key_shares = list(state["key_share_nids"]), list(state["key_shares"])
    masked = (vector.astype(np.int64) + _mask(state["rd_seed"], modulus, vector.size)) % modulus
    for src, ciphertext in zip(srcs, ciphertexts):
        if src not in neighbours:
            _fail(f"secure aggregation: shares from node {src}, which is not a neighbour")
        try:
            plaintext = decrypt(_pairwise_seed(state["sk2"], neighbours[src][1]), ciphertext)
        except InvalidToken:
            _fail(f"secure aggregation: the shares from node {src} do not decrypt (forged or corrupted)")
        actual_src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if (actual_src, dst) != (src, me):
            _fail(f"secure aggregation: shares labelled {actual_src} → {dst} arrived as {src} → {me}")
        seed_nids.append(src)
        seed_shares.append(seed_share)
        key_nids.append(src)
        key_shares.append(key_share)
        pairwise = _mask(_pairwise_seed(state["sk1"], neighbours[src][0]), modulus, vector.size)
        masked = (masked + pairwise if me > src else masked - pairwise) % modulus
    new_state = {**state, "stage": Stage.COLLECT_MASKED_VECTORS, "seed_share_nids": seed_nids,
                 "seed_shares": seed_shares, "key_share_nids": key_nids, "key_shares": key_shares}
    del new_state["rd_seed"]  # the seed is no longer needed; its shares rebuild it if asked
    return {MASKED: vector_to_bytes(masked, modulus)}, new_state


def client_unmask(inbound: Mapping, state: Mapping) -> tuple[dict, dict]:
    """Stage 3: its share of b_v for every surviving neighbour v and of sk1_v for every dropped one, after
    checking the two lists are disjoint (revealing both would unmask v's vector)."""
    _expect(state, Stage.UNMASK)
    active = _typed_list(inbound, Key.ACTIVE_NODE_ID_LIST, int)
    dead = _typed_list(inbound, Key.DEAD_NODE_ID_LIST, int)
    if set(active) & set(dead) or len(set(active)) != len(active) or len(set(dead)) != len(dead):
        _fail("secure aggregation refused: a node is listed both as surviving and as dropped")
    if len(active) < state[Key.THRESHOLD]:
        _fail(f"secure aggregation refused: {len(active)} surviving neighbours, below the threshold "
              f"t = {state[Key.THRESHOLD]}")
    seeds = dict(zip(state["seed_share_nids"], state["seed_shares"]))
    keys = dict(zip(state["key_share_nids"], state["key_shares"]))
    if state["nid"] not in active or any(n not in seeds for n in active) or any(n not in keys for n in dead):
        _fail("secure aggregation: asked for shares the node does not hold")
    reply = {Key.NODE_ID_LIST: active + dead, Key.SHARE_LIST: [seeds[n] for n in active] + [keys[n] for n in dead]}
    return reply, {"stage": Stage.UNMASK}  # the round is over: forget keys and shares


def client_stage(inbound: Mapping, state: Mapping, node_id: int,
                 encoded: np.ndarray | None = None) -> tuple[dict, dict]:
    """Run the stage ``inbound[Key.STAGE]`` names; ``encoded`` is needed by the masking stage only.

    Returns ``(reply, new_state)``; raises SecureAggregationError for a payload or a state that breaks
    the protocol (the integration answers with an error, which the server counts as a dropout).
    """
    stage = inbound.get(Key.STAGE)
    if stage == Stage.SETUP:
        return client_setup(inbound, state, node_id)
    if stage in STAGES and state.get("nid") != node_id:
        _fail(f"secure aggregation: stage '{stage}' reached node {node_id} before its setup")
    if stage == Stage.SHARE_KEYS:
        return client_share_keys(inbound, state)
    if stage == Stage.COLLECT_MASKED_VECTORS:
        if encoded is None:
            _fail("secure aggregation: the masking stage needs the node's encoded vector")
        return client_collect_masked_vectors(inbound, state, encoded)
    if stage == Stage.UNMASK:
        return client_unmask(inbound, state)
    _fail(f"secure aggregation: unknown stage {stage!r}")


# --- server side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecureSum:
    """What the server learns: the sum mod M of the contributors' integer vectors, and who they are."""

    total: np.ndarray
    contributors: tuple[int, ...]
    dropped: tuple[int, ...]


def neighbour_graph(node_ids: Sequence[int], num_shares: int, rng: np.random.Generator) -> dict[int, set[int]]:
    """SecAgg+'s graph: nodes on a ring in a random order, each with the k//2 nodes on either side and itself
    (every node when k equals the sample: SecAgg's complete graph)."""
    order = [int(node_ids[i]) for i in rng.permutation(len(node_ids))]
    m, half = len(order), num_shares // 2
    if num_shares >= m:
        return {nid: set(order) for nid in order}
    return {nid: {order[(i + off) % m] for off in range(-half, half + 1)} for i, nid in enumerate(order)}


def _check_alive(stage: str, alive: set[int], graph: Mapping[int, set[int]], params: ProtocolParams) -> None:
    short = sorted(nid for nid in alive if len(graph[nid] & alive) < params.threshold)
    if len(alive) < params.threshold or short:
        raise SecureAggregationAborted(
            f"secure aggregation aborted after stage '{stage}': {len(alive)} of {params.num_sampled} sampled nodes "
            f"answered, and the threshold is t = {params.threshold} live neighbours per node; no aggregate")


def _answered(stage: str, replies: Mapping[int, dict], asked: set[int],
              check: Callable[[int, dict], object]) -> dict[int, object]:
    """The checked replies of the nodes asked; a malformed one counts as a dropout (logged)."""
    out = {}
    for nid, reply in replies.items():
        if nid not in asked:
            continue
        try:
            out[nid] = check(nid, reply)
        except SecureAggregationError as exc:
            log.warning("secure aggregation, stage '%s': node %s's reply is dropped: %s", stage, nid, exc)
    return out


def run_server(node_ids: Sequence[int], exchange: Exchange, params: ProtocolParams, vector_length: int,
               rng: np.random.Generator) -> SecureSum:
    """Drive the four stages over ``node_ids`` and return only the unmasked sum of the survivors' vectors.

    ``params``: ``SecAggConfig.for_sample``; ``vector_length``: ``VectorLayout.size``; ``rng``: the
    neighbour graph's order (``seeds.secagg_graph_rng``). Nodes may vanish at any stage; the round goes on
    while every survivor keeps t live neighbours and every secret can be rebuilt from t shares, else it
    raises SecureAggregationAborted and nothing is returned.
    """
    ids = [int(n) for n in node_ids]
    if len(set(ids)) != len(ids) or len(ids) != params.num_sampled:
        raise ValueError(f"{len(ids)} node ids (distinct: {len(set(ids))}) for {params.num_sampled} sampled nodes")
    m, k, t, modulus = params.num_sampled, params.num_shares, params.threshold, params.modulus
    graph = neighbour_graph(ids, k, rng)

    # Stage 0: settings out, public keys back.
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: m, Key.SHARE_NUMBER: k, Key.THRESHOLD: t,
             Key.MOD_RANGE: modulus}
    keys = _answered(Stage.SETUP, exchange(Stage.SETUP, {nid: dict(setup) for nid in ids}), set(ids),
                     lambda _, r: (_typed(r, Key.PUBLIC_KEY_1, bytes), _typed(r, Key.PUBLIC_KEY_2, bytes)))
    _check_alive(Stage.SETUP, set(keys), graph, params)

    # Stage 1: neighbours' public keys out, encrypted shares back.
    u1 = set(keys)
    payloads = {}
    for nid in sorted(u1):
        nbrs = sorted(graph[nid] & u1)
        payloads[nid] = {Key.STAGE: Stage.SHARE_KEYS, Key.NODE_ID_LIST: nbrs,
                         PK1S: [keys[n][0] for n in nbrs], PK2S: [keys[n][1] for n in nbrs]}

    def shares_sent(nid: int, reply: dict) -> list[tuple[int, bytes]]:
        dsts, ctxts = _typed_list(reply, Key.DESTINATION_LIST, int), _typed_list(reply, Key.CIPHERTEXT_LIST, bytes)
        if len(dsts) != len(ctxts) or sorted(dsts) != sorted(graph[nid] & u1 - {nid}):
            _fail("the ciphertexts are not addressed to the node's neighbours, one each")
        return list(zip(dsts, ctxts))

    sent = _answered(Stage.SHARE_KEYS, exchange(Stage.SHARE_KEYS, payloads), u1, shares_sent)
    u2 = set(sent)
    _check_alive(Stage.SHARE_KEYS, u2, graph, params)

    # Stage 2: each node's ciphertexts out (from nodes still alive), masked vectors back.
    forwarded: dict[int, list[tuple[int, bytes]]] = {nid: [] for nid in u2}
    for src in sorted(u2):
        for dst, ciphertext in sent[src]:
            if dst in u2:
                forwarded[dst].append((src, ciphertext))
    payloads = {nid: {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: [s for s, _ in forwarded[nid]],
                      Key.CIPHERTEXT_LIST: [c for _, c in forwarded[nid]]} for nid in sorted(u2)}
    masked = _answered(Stage.COLLECT_MASKED_VECTORS, exchange(Stage.COLLECT_MASKED_VECTORS, payloads), u2,
                       lambda _, r: bytes_to_vector(r.get(MASKED), vector_length, modulus))
    u3 = set(masked)
    _check_alive(Stage.COLLECT_MASKED_VECTORS, u3, graph, params)
    dropped = u2 - u3
    total = np.zeros(vector_length, dtype=np.int64)
    for nid in sorted(u3):
        total = (total + masked[nid]) % modulus

    # Stage 3: who survived out, shares back; rebuild b_u of survivors and sk1_v of the dropped.
    requests = {nid: (sorted(graph[nid] & u3), sorted(graph[nid] & dropped)) for nid in sorted(u3)}
    payloads = {nid: {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: a, Key.DEAD_NODE_ID_LIST: d}
                for nid, (a, d) in requests.items()}

    def shares_back(nid: int, reply: dict) -> list[tuple[int, bytes]]:
        owners, shares = _typed_list(reply, Key.NODE_ID_LIST, int), _typed_list(reply, Key.SHARE_LIST, bytes)
        if owners != requests[nid][0] + requests[nid][1] or len(shares) != len(owners):
            _fail("the shares returned are not the ones asked for")
        return list(zip(owners, shares))

    collected: dict[int, list[bytes]] = {nid: [] for nid in u3 | dropped}
    for pairs in _answered(Stage.UNMASK, exchange(Stage.UNMASK, payloads), u3, shares_back).values():
        for owner, share in pairs:
            collected[owner].append(share)
    for owner, shares in sorted(collected.items()):
        if len(shares) < t:
            raise SecureAggregationAborted(
                f"secure aggregation aborted at stage '{Stage.UNMASK}': {len(shares)} shares of node {owner}'s "
                f"secret came back, below the threshold t = {t}; no aggregate")
        try:
            secret = combine_shares(shares[:t])
        except ValueError:
            raise SecureAggregationAborted(f"secure aggregation aborted: node {owner}'s shares do not combine "
                                           "(corrupted shares); no aggregate") from None
        if owner in u3:
            total = (total - _mask(secret, modulus, vector_length)) % modulus
            continue
        for nbr in sorted(v for v in u3 if any(src == owner for src, _ in forwarded[v])):  # masked with owner
            pairwise = _mask(_pairwise_seed(secret, keys[nbr][0]), modulus, vector_length)
            total = (total - pairwise if nbr > owner else total + pairwise) % modulus
    log.info("secure aggregation: unmasked the sum of %d of %d sampled nodes", len(u3), m)
    return SecureSum(total=total, contributors=tuple(sorted(u3)), dropped=tuple(sorted(set(ids) - u3)))
