"""Named backgrounds and caches: in memory, or in Redis shared by every replica."""
