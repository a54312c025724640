"""Command line front-ends over the engine."""
