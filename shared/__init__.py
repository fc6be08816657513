"""What the gateway and the fetcher share: protocol, codec, Redis names, settings, metrics."""
