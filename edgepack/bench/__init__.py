"""Device profiles and benchmark runs (the timing loop itself lives in edgepack.runtime.bench)."""
