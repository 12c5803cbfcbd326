"""Names of the message fields the server and the sites exchange beyond Flower's own (one definition,
imported by server/ and client/, which never import each other).

    AUDIT_ANCHOR   server -> site, in every round's fit config and in the final model's delivery: the
                   server's run audit-log head (entries, last hash) signed with the consortium's
                   model-signing key; the site keeps the newest per run (privacy.audit.AnchorStore).
    AUDIT_HEAD     site -> server, in the fit metrics and the delivery reply: the last hash of the site's
                   audit log after the round's entry; the server records it in its run audit log.

    PREVIOUS_ROUND server -> site, in a round's fit config: JSON {"round", "status", "reason"} of the round
                   before (e.g. "abandoned": its sum was never unmasked); a distributed-DP site records it
                   in that round's ledger entry.

Each party's copy of the other's head is what `oncofed audit verify --anchors` checks a log against:
a log rewritten from the start, chain and head recomputed, no longer holds the anchored hash.
"""

AUDIT_ANCHOR = "audit-anchor"
AUDIT_HEAD = "audit-head"
PREVIOUS_ROUND = "previous-round"
