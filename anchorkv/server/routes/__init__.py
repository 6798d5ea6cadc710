"""One router per API; each module's `router(svc)` returns its routes, sharing the `Service`."""
