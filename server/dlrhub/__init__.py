"""dlrhub: delivery reports from every provider, normalised, stored and served over gRPC.

Data flows one way, through one package per layer:

    transport/   gRPC Ingest, the webhooks (HTTP in), the poller (HTTP out)
        │
    normalise/   pure: provider JSON → DeliveryReports + per-item rejections
        │
    write/       the writer normalises and submits; the committer applies each submission
        │        (merge.py: the state machine) in one durable group commit
    store/       the Store seam (base.py) and its engine (SQLite)
        │
    feed/        after each commit: the hub fans changes out, follow reads the store then the hub
        │
    transport/   Stream and StreamBatches subscribers (the other RPCs read the store)

app.py builds and wires the parts (the composition root), cli.py is `dlrhub serve`, config.py the
settings, errors.py the domain errors and the one map to gRPC statuses, observability/ the metrics,
per-call log lines (where every call's failure becomes its status), the store's health, tracing and
log format. The client, dlrhub_client, never imports this package.
"""

__version__ = "0.1.0"
