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

The ``end_to_end`` section (k = 4 and 8 members as separate processes, first
query with key exchange and later ones) is left for the protocol wiring and
written as ``null`` here.

Run ``python -m benchmarks.he`` (``--quick`` for a smoke run). Writes
``benchmarks/results/he.json``. The machine may be shared: ``load_average``
is recorded with the figures.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats and seeds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    repeat = 1 if args.quick else 3
    seeds = [0] if args.quick else [0, 1, 2]
    epochs = 10 if args.quick else 50
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "tenseal": ts.__version__,
            "torch": torch.__version__,
            "load_average_at_start": os.getloadavg(),
        },
    }
    keys, secret, pub, pub_ng = bench_keys(repeat)
    results["keys"] = keys
    member = he.load_public_context(pub, require_galois=True)
    member_ng = he.load_public_context(pub_ng)
    split = load_digits_split()
    peer = train_he_peer_models(10, 0.1, 0, split=split, epochs=epochs)[0]
    model = peer.answer_model
    results["single"] = bench_single(secret, member, model, split.X_test, repeat)
    results["single_raw_logits_64_32_10"] = bench_single(
        secret, member, peer.model, split.X_test, repeat
    )
    sizes = [1, 450] if args.quick else [1, 450, 4096]
    results["batched"] = bench_batched(secret, member_ng, model, split.X_test, sizes, repeat)
    results["mask_bound"] = bench_mask_bound(secret, member, member_ng, peer.model, split.X_test)
    results["accuracy"] = bench_accuracy(seeds, epochs)
    results["accuracy"]["he_vs_plaintext_collective"] = bench_he_vs_plain(
        secret, member_ng, 0, epochs, 4 if args.quick else 10
    )
    results["end_to_end"] = {
        "status": "pending: needs the protocol wiring (issue 11 part 4)",
        "k4": {"first_query_s": None, "later_query_s": None, "bytes_per_query": None},
        "k8": {"first_query_s": None, "later_query_s": None, "bytes_per_query": None},
        "goal": "k=8 HE query < 2 s after key exchange; >= 1000 inputs/s per member batched",
    }
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
