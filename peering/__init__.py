"""Algorithm-to-algorithm networking between organizations, without a VPN or inbound ports.

Runs of one federated job at different organizations reach each other's declared ports
through their nodes: run → own node's proxy (a local forwarder) → the node's outbound
WebSocket to a relay the consortium runs beside the vantage6 server → the peer node →
the peer run. The relay only moves ciphertext between authenticated nodes; the two nodes
encrypt and authenticate to each other with their organizations' keys, which the server
already publishes, and each node admits a stream only between runs of the same job.

The layers, bottom up:

* :mod:`peering.frames` — the byte formats: the relay envelope and the stream frames.
* :mod:`peering.session` — the end-to-end session between two nodes (X25519 signed with the
  organizations' RSA keys, AES-256-GCM with counters).
* :mod:`peering.identity` — who a node is, checked with the vantage6 server.
* :mod:`peering.relay` — ``fednode relay``: authenticates nodes, forwards envelopes.
* :mod:`peering.link` — a node's reconnecting WebSocket to the relay.
* :mod:`peering.streams` — TCP streams multiplexed over the sessions, with credit-based
  flow control, caps and idle timeouts.

docs/networking.md says how it fits together, the trust model and how to deploy it.
"""
