"""CKKS query mode: in-process costs, mask bounds and accuracy.

Measures, on this machine, with the parameters of ``fi_peer.privacy.he``:

* keys: context creation, public context bytes (with / without Galois keys),
  loading at a member;
* layouts: single (CKKSVector) and batched (CKKSTensor) — encrypt, member
  evaluation, decrypt, bytes per query, batched inputs/s per member;
* the bound on what a member may add at the last level (masks) in both layouts;
* accuracy: ReLU vs square 64-32-10 (pooled), HE vs plaintext on the whole
  test split, and the collective answer of 10 peers at alpha 0.1 for several
  choices of each member's HE vector (plaintext simulation of the same
  polynomials), with an HE check of the chosen one on a sample.

* end to end (``end_to_end``): k = 4 and 8 members as separate ``fi-peer run``
  processes over libp2p on this machine (plus the querier's daemon), an
  input-private query through the control API: the first one (with the key
  exchange: the public context to every member) and later ones, bytes on the
  wire per query (from the sizes of the sealed messages), and the answers'
  agreement with the plaintext sum of the same members' HE models.

Run ``python -m benchmarks.he`` (``--quick`` for a smoke run; ``--sections
end_to_end,batched`` re-measures only those and keeps the rest of the JSON).
Writes ``benchmarks/results/he.json``. The machine may be shared:
``load_average`` is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import torch
from tenseal import sealapi

from fi_peer.models.aggregation import get_rule
from fi_peer.models.data import load_digits_split
from fi_peer.models.he_models import train_he_network, train_he_peer_models
from fi_peer.models.zoo import derive_seed, train_classifier
from fi_peer.privacy import he

DEFAULT_OUT = Path(__file__).parent / "results" / "he.json"
ARCH_RELU = "mlp-64-32-10"


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds over ``repeat`` calls, and the last result."""
    times: list[float] = []
    result: Any = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


def bench_keys(repeat: int) -> tuple[dict[str, Any], he.SecretContext, bytes, bytes]:
    t_ctx, secret = _timed(lambda: he.create_secret_context(galois_keys=False), repeat)
    t_gal, secret = _timed(lambda: he.create_secret_context(galois_keys=True), 1)
    t_pub, pub = _timed(lambda: secret.public_bytes(galois_keys=True), 1)
    t_pub_ng, pub_ng = _timed(lambda: secret.public_bytes(galois_keys=False), repeat)
    t_load, _ = _timed(lambda: he.load_public_context(pub), 1)
    t_load_ng, _ = _timed(lambda: he.load_public_context(pub_ng), repeat)
    max_bits = sealapi.CoeffModulus.MaxBitCount(
        he.POLY_MODULUS_DEGREE, sealapi.SEC_LEVEL_TYPE.TC128
    )
    return (
        {
            "poly_modulus_degree": he.POLY_MODULUS_DEGREE,
            "coeff_mod_bit_sizes": list(he.COEFF_MOD_BIT_SIZES),
            "scale_bits": he.SCALE_BITS,
            "total_bits": sum(he.COEFF_MOD_BIT_SIZES),
            "max_bits_128_bit_security": max_bits,
            "context_ms": _ms(t_ctx),
            "context_with_galois_ms": _ms(t_gal),
            "public_context_bytes": len(pub),
            "public_context_bytes_without_galois": len(pub_ng),
            "serialize_public_ms": _ms(t_pub),
            "serialize_public_without_galois_ms": _ms(t_pub_ng),
            "member_load_ms": _ms(t_load),
            "member_load_without_galois_ms": _ms(t_load_ng),
            "chunks_of_1MiB": len(he.chunk_context(pub)),
        },
        secret,
        pub,
        pub_ng,
    )


def bench_single(
    secret: he.SecretContext,
    member: he.PublicContext,
    model: he.HEModel,
    x: np.ndarray,
    repeat: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    t_enc, query = _timed(lambda: he.encrypt_inputs(secret, x[:1]), repeat)
    t_eval, out = _timed(lambda: he.evaluate(member, model, query, noise_std=1.0, rng=rng), repeat)
    t_dec, values = _timed(lambda: he.decrypt_outputs(secret, out), repeat)
    clean = he.decrypt_outputs(secret, he.evaluate(member, model, query))
    return {
        "encrypt_ms": _ms(t_enc),
        "member_eval_ms": _ms(t_eval),
        "decrypt_ms": _ms(t_dec),
        "request_bytes": query.nbytes,
        "response_bytes": out.nbytes,
        "max_abs_error_vs_plaintext": float(np.abs(clean - model.forward(x[:1])).max()),
        "output_dim": model.output_dim,
        "decrypted_shape": list(values.shape),
    }


def bench_batched(
    secret: he.SecretContext,
    member: he.PublicContext,
    model: he.HEModel,
    X: np.ndarray,
    sizes: list[int],
    repeat: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    rows: dict[str, Any] = {}
    for b in sizes:
        xb = np.resize(X, (b, X.shape[1]))
        t_enc, query = _timed(
            lambda xb=xb: he.encrypt_inputs(secret, xb, layout=he.Layout.BATCHED), 1
        )
        t_eval, out = _timed(
            lambda q=query: he.evaluate(member, model, q, noise_std=1.0, rng=rng), repeat
        )
        t_dec, _ = _timed(lambda o=out: he.decrypt_outputs(secret, o), 1)
        rows[str(b)] = {
            "encrypt_ms": _ms(t_enc),
            "member_eval_ms": _ms(t_eval),
            "decrypt_ms": _ms(t_dec),
            "request_bytes": query.nbytes,
            "response_bytes": out.nbytes,
            "inputs_per_s_per_member": round(b / t_eval, 1),
            "member_ms_per_input": round(1e3 * t_eval / b, 3),
        }
    return rows


def bench_mask_bound(
    secret: he.SecretContext,
    member: he.PublicContext,
    member_ng: he.PublicContext,
    model: he.HEModel,
    x: np.ndarray,
) -> dict[str, Any]:
    """Largest uniform mask +/-B a member can add at the last level and still decrypt."""
    bounds = [1e5, 1e6, 1e7, 1e8, 3e8, 5e8, 1e9, 1e10]
    rng = np.random.default_rng(2)
    result: dict[str, Any] = {}
    for layout, ctx in ((he.Layout.SINGLE, member), (he.Layout.BATCHED, member_ng)):
        n = 1 if layout is he.Layout.SINGLE else 8
        query = he.encrypt_inputs(secret, x[:n], layout=layout)
        out = he.evaluate(ctx, model, query)
        truth = he.decrypt_outputs(secret, out)
        errors: dict[str, float] = {}
        for bound in bounds:
            mask = rng.uniform(-bound, bound, size=truth.shape)
            if layout is he.Layout.SINGLE:
                vec = ts.ckks_vector_from(ctx._ctx, out.blobs[0])
                masked_blobs: tuple[bytes, ...] = (
                    bytes((vec + ts.ckks_vector(ctx._ctx, mask[0].tolist())).serialize()),
                )
            else:
                tensor = ts.ckks_tensor_from(ctx._ctx, out.blobs[0])
                plain = ts.plain_tensor(mask.reshape(n, 1, -1).tolist())
                masked_blobs = (
                    bytes((tensor + ts.ckks_tensor(ctx._ctx, plain, batch=True)).serialize()),
                )
            masked = he.EncryptedOutput(
                layout=layout, n_inputs=n, output_dim=out.output_dim, blobs=masked_blobs
            )
            got = he.decrypt_outputs(secret, masked) - mask
            errors[f"{bound:.0e}"] = float(np.abs(got - truth).max())
        ok = [b for b in bounds if errors[f"{b:.0e}"] < 1e-2]
        result[str(layout)] = {
            "max_abs_error_by_mask_bound": errors,
            "largest_safe_bound": max(ok) if ok else None,
        }
    return result


def _acc(scores: np.ndarray, y: np.ndarray) -> float:
    return round(100.0 * float((scores.argmax(axis=1) == y).mean()), 2)


def bench_accuracy(seeds: list[int], epochs: int) -> dict[str, Any]:
    split = load_digits_split()
    X, y = split.X_test, split.y_test
    pooled: dict[str, list[float]] = {"relu_ce": [], "square_ce": [], "square_mse": []}
    for seed in seeds:
        s = derive_seed(seed, 2)
        relu = train_classifier(split.X_train, split.y_train, arch=ARCH_RELU, epochs=epochs, seed=s)
        with torch.no_grad():
            pooled["relu_ce"].append(_acc(relu(torch.from_numpy(X)).numpy(), y))
        for loss in ("ce", "mse"):
            net = train_he_network(split.X_train, split.y_train, loss=loss, epochs=epochs, seed=s)
            with torch.no_grad():
                pooled[f"square_{loss}"].append(_acc(net(torch.from_numpy(X)).numpy(), y))
    support = get_rule("support")
    collective: dict[str, list[float]] = {
        "sum_of_ce_logits": [],
        "sum_of_mse_outputs": [],
        "support_mse [n f, n]": [],
        "weighted_mse [n f] (no denominator)": [],
        "best_single_member": [],
    }
    for seed in seeds:
        mse = train_he_peer_models(10, 0.1, seed, split=split, loss="mse", epochs=epochs)
        ce = train_he_peer_models(10, 0.1, seed, split=split, loss="ce", epochs=epochs)
        collective["sum_of_ce_logits"].append(_acc(sum(p.model.forward(X) for p in ce), y))
        collective["sum_of_mse_outputs"].append(_acc(sum(p.model.forward(X) for p in mse), y))
        total = sum(p.answer_model.forward(X) for p in mse)
        labels, _ = support.decide_batch(total)
        collective["support_mse [n f, n]"].append(round(100.0 * float((labels == y).mean()), 2))
        collective["weighted_mse [n f] (no denominator)"].append(_acc(total[:, :10], y))
        collective["best_single_member"].append(max(_acc(p.model.forward(X), y) for p in mse))
    mean = {k: round(float(np.mean(v)), 2) for k, v in collective.items()}
    return {
        "seeds": seeds,
        "epochs": epochs,
        "pooled_64_32_10": {
            k: {"mean": round(float(np.mean(v)), 2), "runs": v} for k, v in pooled.items()
        },
        "collective_alpha_0.1_10_peers": {"mean": mean, "runs": collective},
        "reference_default_mode_relu_64_128_10": {
            "note": "from benchmarks/results/accuracy.json / notes/aggregation.md",
            "evidence_parzen": 94.8,
            "support": 85.9,
            "soft": 65.6,
        },
    }


def bench_he_vs_plain(
    secret: he.SecretContext, member_ng: he.PublicContext, seed: int, epochs: int, n_members: int
) -> dict[str, Any]:
    """The chosen vector under HE: the whole test split in one batch per member, summed."""
    split = load_digits_split()
    X, y = split.X_test, split.y_test
    peers = train_he_peer_models(10, 0.1, seed, split=split, loss="mse", epochs=epochs)[:n_members]
    names = [f"m{i}" for i in range(len(peers))]
    query = he.encrypt_inputs(secret, X, layout=he.Layout.BATCHED)
    rng = np.random.default_rng(3)
    t0 = time.perf_counter()
    parts = [
        he.contribute(member_ng, p.answer_model, query, member=m, noise_std=0.0, rng=rng)
        for m, p in zip(names, peers, strict=True)
    ]
    eval_s = time.perf_counter() - t0
    total = he.combine(member_ng, parts)
    got = he.open_aggregate(secret, total, committee=names, threshold=len(names))
    plain = sum(p.answer_model.forward(X) for p in peers)
    support = get_rule("support")
    he_labels, _ = support.decide_batch(got)
    plain_labels, _ = support.decide_batch(plain)
    return {
        "members": len(peers),
        "inputs": int(X.shape[0]),
        "max_abs_error": float(np.abs(got - plain).max()),
        "max_abs_value": float(np.abs(plain).max()),
        "argmax_disagreements": int((he_labels != plain_labels).sum()),
        "he_accuracy": round(100.0 * float((he_labels == y).mean()), 2),
        "plaintext_accuracy": round(100.0 * float((plain_labels == y).mean()), 2),
        "member_eval_s_total": round(eval_s, 2),
        "tolerance_stated": "abs error <= 1e-5 x max |value| (values up to ~2e3: counts x outputs)",
    }


def _sealed_sizes(
    k: int, model: he.HEModel, secret: he.SecretContext, x: np.ndarray
) -> dict[str, int]:
    """Bytes on the wire of one input-private query with k members (after the key
    exchange), from the real sealed envelopes of each message kind."""
    from fi_peer.identity import Identity
    from fi_peer.protocol.envelope import seal
    from fi_peer.protocol.he_messages import (
        HEAccept,
        HEOffer,
        HEPartial,
        HEReady,
        HERequest,
        HERoute,
    )
    from fi_peer.protocol.messages import Receipt, Result

    ids = [Identity.from_seed(f"bench-{i}".encode()) for i in range(k + 1)]
    members = tuple(i.peer_id for i in ids[1:])
    query = he.encrypt_inputs(secret, x[None, :], layout=he.Layout.SINGLE)
    member = he.load_public_context(secret.public_bytes(galois_keys=True), require_galois=True)
    out = he.evaluate(member, model, query, noise_std=1.0, rng=np.random.default_rng(0))
    qid = b"q" * 16
    digest = "0" * 64
    request = HERequest(
        query_id=qid,
        task="digits",
        n_classes=10,
        input_dim=64,
        rule="support",
        vector_len=model.output_dim,
        k=k,
        max_price_wei=0,
        deadline_ms=1,
        reply_key=b"k" * 32,
        epsilon=0.0,
        delta=0.0,
        context_digest=digest,
        n_inputs=1,
        layout="single",
    )
    offer = HEOffer(
        query_id=qid, price_wei=0, expected_latency_ms=1, eth_address="", has_context=True
    )
    accept = HEAccept(
        query_id=qid,
        members=members,
        eth_addresses=("",) * k,
        threshold=k // 2 + 1,
        fan_in=4,
        price_wei=0,
        noise_sigma=0.0,
        context_digest=digest,
        blobs=query.blobs,
    )
    partial = HEPartial(
        query_id=qid, querier=ids[0].peer_id, members=tuple(sorted(members)), blobs=out.blobs
    )
    receipt = Receipt(query_id=qid, member=members[0], share_digest=b"d" * 32, price_wei=0)
    result = Result(query_id=qid, ok=True, contributors=tuple(sorted(members)))

    def size(msg: Any) -> int:
        return len(seal(ids[0], msg, 1))

    per_member = {
        "he_offer": size(offer),
        "he_accept": size(accept),
        "he_ready": size(HEReady(query_id=qid)),
        "he_route": size(HERoute(query_id=qid, live=members, hop_ms=1500)),
        "he_partial": size(partial),
        "receipt": size(receipt),
        "result": size(result),
    }
    total = k * sum(per_member.values()) + k * size(request)  # gossip: ~once per peer
    return {"per_member": per_member, "he_request": size(request), "total": total}  # type: ignore[dict-item]


def bench_end_to_end(ks: list[int], later: int, folder: Path) -> dict[str, Any]:
    from fi_peer.control import ControlClient
    from fi_peer.he_runtime import HE_RULE, he_model_path, load_he_model
    from fi_peer.localnet import LocalNetwork, ensure_models, sample_inputs
    from fi_peer.models.aggregation import decide
    from fi_peer.models.he_models import ensure_he_models

    n = max(ks) + 1
    models = ensure_models(folder / "models", n, 0.5, 1, 10)
    ensure_he_models(models, 0.5, 1, epochs=20)
    he_models = [load_he_model(he_model_path(p)) for p in models]
    samples = sample_inputs(models[0].parent)
    xs = np.asarray(samples["inputs"], dtype=np.float64)
    secret = he.create_secret_context(galois_keys=True)
    public_bytes = len(secret.public_bytes(galois_keys=True))
    out: dict[str, Any] = {"transport": "libp2p", "processes": "one fi-peer run per peer"}
    for k in ks:
        net = LocalNetwork(
            folder / f"net-k{k}",
            transport="libp2p",
            announce_interval_ms=1000,
            offer_window_ms=10_000,
        )
        row: dict[str, Any] = {}
        try:
            net.prepare(models[: k + 1])
            net.start_all()
            net.wait_ready(timeout=300)
            net.wait_connected(timeout=120)
            net.wait_converged(timeout=120)
            client = ControlClient.from_state_dir(net.peers[0].state_dir / "control.json")
            by_id = {p.peer_id: i for i, p in enumerate(net.peers)}
            walls: list[float] = []
            agree = 0
            answered = 0
            reasons: list[str] = []
            for q in range(1 + later):
                x = xs[q % len(xs)]
                started = time.perf_counter()
                answer = client.post(
                    "/v1/query",
                    {"input": x.tolist(), "input_private": True, "k": k, "timeout_s": 110},
                    timeout=130,
                )
                wall = time.perf_counter() - started
                result = answer["results"][0]
                if not result["ok"]:
                    reasons.append(str(result["reason"]))
                    continue
                answered += 1
                members = [by_id[p] for p in result["contributors"]]
                total = sum(he_models[i].forward(x[None, :])[0] for i in members)
                agree += int(result["label"] == decide(total, HE_RULE)[0])
                if q == 0:
                    row["first_query_s"] = round(wall, 3)
                    row["first_contributors"] = len(members)
                else:
                    walls.append(wall)
            row["later_query_s"] = {
                "median": round(statistics.median(walls), 3) if walls else None,
                "min": round(min(walls), 3) if walls else None,
                "max": round(max(walls), 3) if walls else None,
                "n": len(walls),
            }
            row["answered"] = f"{answered}/{1 + later}"
            row["failures"] = reasons
            row["labels_equal_plaintext_sum"] = f"{agree}/{answered}"
            row["key_exchange_bytes"] = public_bytes * k
        finally:
            net.stop_all()
        row["bytes_per_query"] = _sealed_sizes(k, he_models[1], secret, xs[0])
        row["load_average_after"] = os.getloadavg()
        out[f"k{k}"] = row
    out["goal"] = "k=8 HE query < 2 s after key exchange; >= 1000 inputs/s per member batched"
    return out


SECTIONS = ("keys", "single", "batched", "mask_bound", "accuracy", "end_to_end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats and seeds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated subset to measure; the others are kept from --out",
    )
    parser.add_argument("--later", type=int, default=5, help="queries after the first (e2e)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fi-peer-he-bench"))
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    repeat = 1 if args.quick else 3
    seeds = [0] if args.quick else [0, 1, 2]
    epochs = 10 if args.quick else 50
    started = time.perf_counter()
    results: dict[str, Any] = {}
    if sections != set(SECTIONS) and args.out.is_file():
        results = json.loads(args.out.read_text())
    results["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "tenseal": ts.__version__,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
        "sections_measured_in_this_run": sorted(sections),
    }
    keys, secret, pub, pub_ng = bench_keys(repeat)
    if "keys" in sections:
        results["keys"] = keys
    member = he.load_public_context(pub, require_galois=True)
    member_ng = he.load_public_context(pub_ng)
    split = load_digits_split()
    peer = train_he_peer_models(10, 0.1, 0, split=split, epochs=epochs)[0]
    model = peer.answer_model
    if "single" in sections:
        results["single"] = bench_single(secret, member, model, split.X_test, repeat)
        results["single_raw_logits_64_32_10"] = bench_single(
            secret, member, peer.model, split.X_test, repeat
        )
    if "batched" in sections:
        sizes = [1, 450] if args.quick else [1, 450, 4096]
        results["batched"] = bench_batched(secret, member_ng, model, split.X_test, sizes, repeat)
    if "mask_bound" in sections:
        results["mask_bound"] = bench_mask_bound(
            secret, member, member_ng, peer.model, split.X_test
        )
    if "accuracy" in sections:
        results["accuracy"] = bench_accuracy(seeds, epochs)
        results["accuracy"]["he_vs_plaintext_collective"] = bench_he_vs_plain(
            secret, member_ng, 0, epochs, 4 if args.quick else 10
        )
    if "end_to_end" in sections:
        ks = [4] if args.quick else [4, 8]
        results["end_to_end"] = bench_end_to_end(ks, 2 if args.quick else args.later, args.work)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
