"""The ways in and out: the gRPC servicer, the provider webhooks (HTTP in) and the poller (HTTP out),
with authentication and TLS. Each turns a request into calls on write/ and store/, and a result
back into a response; none holds domain logic."""
