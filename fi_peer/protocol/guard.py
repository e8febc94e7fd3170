"""The member's privacy policy and budget, as the protocol core sees them.

The core does no I/O, so it cannot read or write the owner's budget ledger
itself. The driver hands the responder an object with this interface (the
agent adapts fi_peer.privacy.budget.BudgetLedger to it; tests use an
in-memory one). The core reads it synchronously (cheap reads only):

- ``required_sigma`` and ``check`` when a QueryRequest arrives: a member that
  cannot afford the answer (or will not answer this rule under DP) sends a
  Decline with the reason instead of an Offer;
- ``required_sigma`` again when the Accept arrives: the querier's noise scale
  must be at least what the owner's policy needs for the requested epsilon.

``charge`` is a durable write (an fsync), so the core never calls it: when a
share is ready it emits a ``Charge`` effect and waits; the driver calls
``charge`` (off its event loop if it likes) and reports back with
``PeerCore.charged``. Only then does the share leave, so there is never an
answer without its charge (a crash after the charge loses budget, never
privacy). A refusal there becomes a Decline.

``sigma`` is always the std of the Gaussian noise protecting this member's
contribution in what the querier sees: the noise scale of the sum under
secure aggregation, ``sigma / sqrt(t)`` for a plaintext share.
"""

from __future__ import annotations

from typing import Protocol

from fi_peer.protocol.messages import QueryRequest


class PrivacyGuard(Protocol):
    def required_sigma(self, request: QueryRequest) -> float | None:
        """Least noise std of the sum this owner needs to answer ``request``
        (0.0 for none); None: it does not answer such requests at all."""
        ...

    def check(self, querier: str, request: QueryRequest, sigma: float, now_ms: int) -> str | None:
        """Why an answer protected by noise ``sigma`` would not fit the budget
        now (a short reason token), or None when it would."""
        ...

    def charge(
        self, querier: str, request: QueryRequest, sigma: float, now_ms: int
    ) -> str | None:
        """Record the answer's cost durably; None when charged, else a reason token."""
        ...
