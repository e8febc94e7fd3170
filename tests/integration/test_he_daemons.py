"""``fi-peer query --input-private`` answered by ``fi-peer run`` daemons over libp2p.

Three daemons (separate processes); the zoo's owner models plus their HE-ready
models (``<model>.he.npz``, trained by fi_peer.models.he_models for the same
partition). Peer 0 asks with its input encrypted under its own CKKS key; the
two others evaluate on the ciphertext and sum among themselves; peer 0
decrypts the aggregate only. The answer must be the label of the plaintext sum
of the two members' HE models (the CKKS error is ~1e-4, far below the margins).
The first query carries the key exchange (~12 MB of public context to each
member); the second reuses the members' cached contexts. Both ask for the
``support`` rule without DP (exact check); a third uses the default rule of
the mode, the kernel evidence, under the config's DP (epsilon 2): members with
finite budgets answer it, each adding its noise share inside the ciphertext.
A fourth asks 64 inputs with the ``support`` rule: one batched query (one
CKKSTensor, ~14 MB, chunked over the direct channel with flow control; the
batched sum comes back chunked too), labels equal to the plaintext sums.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fi_peer.he_runtime import HE_RULE, he_model_path, kernel_model_path, load_he_model
from fi_peer.models.aggregation import decide
from fi_peer.models.he_models import ensure_he_models
from tests.integration.conftest import ALPHA, EPOCHS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PEERS = 3
BATCH = 64


def test_input_private_query_answered_by_libp2p_daemons(
    tmp_path: Path, owner_models: list[Path], local_network: Any, samples: dict[str, Any]
) -> None:
    ensure_he_models(owner_models, ALPHA, 1, epochs=EPOCHS)
    net = local_network.LocalNetwork(
        tmp_path / "net", transport="libp2p", announce_interval_ms=500, offer_window_ms=1500
    )
    try:
        net.prepare(owner_models[:PEERS])
        net.start_all()
        net.wait_ready(timeout=120)
        net.wait_connected(timeout=60)
        net.wait_converged(timeout=60)
        querier = net.peers[0]
        x = np.asarray(samples["inputs"][0], dtype=np.float64)
        path = tmp_path / "x.json"
        path.write_text(json.dumps(x.tolist()))
        by_id = {p.peer_id: i for i, p in enumerate(net.peers)}
        for rule in (HE_RULE, HE_RULE, None):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fi_peer.cli",
                    "query",
                    str(path),
                    "--input-private",
                    *(["--rule", rule] if rule else []),
                    "--k",
                    str(PEERS - 1),
                    "--timeout",
                    "100",
                    "--json",
                    "--config",
                    str(querier.config),
                ],
                capture_output=True,
                text=True,
                timeout=150,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            answer = json.loads(done.stdout)
            assert answer["input_private"] is True
            result = answer["results"][0]
            assert result["ok"], result
            members = [by_id[p] for p in result["contributors"]]
            assert sorted(members) == [1, 2]
            if rule is None:  # kernel evidence under DP: noisy, only well-formed
                assert kernel_model_path(owner_models[1]).is_file()
                assert 0 <= result["label"] < 10
                continue
            total = sum(
                load_he_model(he_model_path(owner_models[i])).forward(x[None, :])[0]
                for i in members
            )
            label, _ = decide(total, HE_RULE)
            assert result["label"] == label
        # Batched: 64 inputs in one query (chunked request and answer).
        pool = np.asarray(samples["inputs"], dtype=np.float64)
        xs = pool[np.arange(BATCH) % len(pool)]  # the samples repeated to 64 rows
        path.write_text(json.dumps(xs.tolist()))
        done = subprocess.run(
            [
                sys.executable, "-m", "fi_peer.cli", "query", str(path), "--input-private",
                "--rule", HE_RULE, "--k", str(PEERS - 1), "--timeout", "100", "--json",
                "--config", str(querier.config),
            ],
            capture_output=True,
            text=True,
            timeout=150,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        results = json.loads(done.stdout)["results"]
        assert len(results) == BATCH and len({r["query_id"] for r in results}) == 1
        assert all(r["ok"] and r["batched_inputs"] == BATCH for r in results), results[0]
        members = [by_id[p] for p in results[0]["contributors"]]
        assert sorted(members) == [1, 2]
        totals = sum(load_he_model(he_model_path(owner_models[i])).forward(xs) for i in members)
        labels = [decide(t, HE_RULE)[0] for t in totals]
        assert [r["label"] for r in results] == labels
    finally:
        net.stop_all()
