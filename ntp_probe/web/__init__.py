"""HTTP: routes, pages, TLS and basic auth."""
